// The sluice console: screens over the HTTP API (/api/v1), which implements every rule; the
// console only shows and asks. Preact with htm's tagged templates, no build step.
import { html, render, useState, useEffect, useCallback, useRef } from "/assets/vendor/preact-htm.mjs";

// ---- The API -------------------------------------------------------------------------------

/** The session's CSRF token (the script-readable cookie the sign-in set). */
function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)sluice_csrf=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

class ApiError extends Error {
  constructor(status, body, retryAfter = null) {
    super(body?.error?.message || `the server answered ${status}`);
    this.status = status;
    this.code = body?.error?.code;
    /** Seconds to wait before asking again (a 429's `Retry-After`). */
    this.retryAfter = retryAfter;
  }
}

/** Sends a request to the API with the session cookie (changes carry the CSRF token); the
 * response when it is a success, else an `ApiError` with the API's message. */
async function request(method, path, body, accept = "application/json") {
  const headers = { Accept: accept };
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(`/api/v1${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  if (response.status === 401) {
    // The session ended (signed out elsewhere, or the token was revoked).
    window.location.assign("/login");
    throw new ApiError(401, null);
  }
  if (!response.ok) {
    const text = await response.text();
    let parsed = null;
    try { parsed = JSON.parse(text); } catch { /* not JSON */ }
    const retryAfter = Number(response.headers.get("Retry-After"));
    throw new ApiError(response.status, parsed, Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter : null);
  }
  return response;
}

/** Calls the API and parses its JSON answer. */
async function api(method, path, body) {
  const text = await (await request(method, path, body)).text();
  return text ? JSON.parse(text) : null;
}

/** Every item of a paginated list. */
async function all(path) {
  const items = [];
  let cursor = null;
  do {
    const separator = path.includes("?") ? "&" : "?";
    const page = await api("GET", `${path}${cursor ? `${separator}cursor=${encodeURIComponent(cursor)}` : ""}`);
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor);
  return items;
}

/** Every item of a list route, or the error that kept it from loading. */
function useList(path) {
  const [items, setItems] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    all(path).then(setItems).catch((e) => setError(e.message));
  }, [path]);
  return [items, error];
}

// ---- Formatting ----------------------------------------------------------------------------

/** A time in the viewer's own time zone. */
function localTime(iso) {
  if (!iso) return "";
  return new Date(iso).toLocaleString(undefined, {
    dateStyle: "medium",
    timeStyle: "short",
  });
}

function relative(iso) {
  const seconds = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  const format = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  if (Math.abs(seconds) < 60) return format.format(-seconds, "second");
  if (Math.abs(seconds) < 3600) return format.format(-Math.round(seconds / 60), "minute");
  if (Math.abs(seconds) < 86400) return format.format(-Math.round(seconds / 3600), "hour");
  return format.format(-Math.round(seconds / 86400), "day");
}

const number = new Intl.NumberFormat();

// ---- Pieces --------------------------------------------------------------------------------

function Status({ status }) {
  return html`<span class="status ${status}">${status}</span>`;
}

/** Records delivered per run, oldest first, drawn by uPlot. */
function Sparkline({ runs, label }) {
  const [node, setNode] = useState(null);
  useEffect(() => {
    if (!node || !window.uPlot || runs.length < 2) return undefined;
    const ordered = [...runs].reverse();
    const xs = ordered.map((_, i) => i);
    const ys = ordered.map((r) => r.counts.delivered);
    const plot = new window.uPlot(
      {
        width: 120,
        height: 32,
        cursor: { show: false },
        legend: { show: false },
        select: { show: false },
        scales: { x: { time: false } },
        axes: [{ show: false }, { show: false }],
        series: [{}, { stroke: "#2451c9", width: 1.5, fill: "rgba(36,81,201,.12)" }],
      },
      [xs, ys],
      node,
    );
    return () => plot.destroy();
  }, [node, runs]);
  if (runs.length < 2) return html`<span class="muted">${runs.length ? "one run" : "no runs"}</span>`;
  return html`<div class="sparkline" ref=${setNode} role="img" aria-label=${label}></div>`;
}

// ---- Screens -------------------------------------------------------------------------------

/** Every mapping with its model, destination, schedule, switch and recent runs. */
function Overview() {
  const [rows, setRows] = useState(null);
  const [error, setError] = useState(null);
  const [notice, setNotice] = useState(null);

  // Bumped by every change made here, so a refresh that started before it cannot undo it.
  const changes = useRef(0);

  const load = useCallback(async () => {
    const started = changes.current;
    try {
      const [mappings, models] = await Promise.all([all("/mappings"), all("/models")]);
      const modelSchedules = Object.fromEntries(models.map((m) => [m.name, m.definition.schedule]));
      const loaded = await Promise.all(
        mappings.map(async (mapping) => {
          const definition = mapping.definition;
          const schedule = definition.schedule ?? modelSchedules[definition.model] ?? "manual";
          const [runs, preview] = await Promise.all([
            api("GET", `/runs?mapping=${encodeURIComponent(mapping.name)}&limit=30`).then((p) => p.runs),
            api("POST", "/schedules/preview", { schedule, count: 1 }).catch(() => null),
          ]);
          return { mapping, definition, runs, preview };
        }),
      );
      if (changes.current !== started) return;
      setRows(loaded);
      setError(null);
    } catch (e) {
      setError(e.message);
    }
  }, []);

  useEffect(() => {
    load();
    // Live: runs started by the scheduler or elsewhere show up within seconds.
    const timer = setInterval(() => document.visibilityState === "visible" && load(), 3000);
    return () => clearInterval(timer);
  }, [load]);

  const setEnabled = (name, enabled) =>
    setRows((current) =>
      current.map((row) =>
        row.mapping.name === name ? { ...row, mapping: { ...row.mapping, enabled } } : row,
      ),
    );

  const toggle = async (name, enabled) => {
    changes.current += 1;
    // Shown at once; put back if the API refuses.
    setEnabled(name, enabled);
    try {
      await api("PATCH", `/mappings/${encodeURIComponent(name)}`, { enabled });
      setNotice(`${name} is ${enabled ? "enabled" : "disabled"}.`);
      setError(null);
    } catch (e) {
      setEnabled(name, !enabled);
      setNotice(null);
      setError(`${name}: ${e.message}`);
    }
    changes.current += 1;
    await load();
  };

  if (error && !rows) return html`<p class="error" role="alert">${error}</p>`;
  if (!rows) return html`<p class="muted">Loading…</p>`;
  return html`
    <h1>Overview</h1>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <p class="muted" role="status" aria-live="polite">${notice ?? ""}</p>
    ${rows.length === 0
      ? html`<div class="panel empty">
          <p><strong>No mappings yet.</strong></p>
          <p class="muted">A mapping sends a model's changed records to a destination. Start with <a href="#/new-source">a source</a>, then <a href="#/new-model">a model</a>, <a href="#/new-destination">a destination</a> and <a href="#/new-mapping">a mapping</a>; or define them in <code>sluice.yaml</code>.</p>
        </div>`
      : html`<div class="panel">
          <table class="list">
            <thead>
              <tr>
                <th scope="col">Mapping</th><th scope="col">Model</th><th scope="col">Destination</th>
                <th scope="col">Schedule</th><th scope="col">Enabled</th><th scope="col">Last run</th>
                <th scope="col">Records sent per run</th>
              </tr>
            </thead>
            <tbody>
              ${rows.map(({ mapping, definition, runs, preview }) => {
                const last = runs[0];
                const next = preview?.next_runs?.[0];
                return html`<tr key=${mapping.name} data-mapping=${mapping.name}>
                  <td data-label="Mapping"><strong>${mapping.name}</strong></td>
                  <td data-label="Model">${definition.model}</td>
                  <td data-label="Destination">${definition.destination}</td>
                  <td data-label="Schedule">
                    ${preview?.description ?? "manual"}
                    ${next && mapping.enabled ? html`<br /><span class="muted">next ${localTime(next)}</span>` : null}
                  </td>
                  <td data-label="Enabled">
                    <label class="switch">
                      <input type="checkbox" checked=${mapping.enabled !== false}
                        aria-label=${`${mapping.name} enabled`}
                        onChange=${(e) => toggle(mapping.name, e.currentTarget.checked)} />
                      ${mapping.enabled !== false ? "on" : "off"}
                    </label>
                  </td>
                  <td data-label="Last run" data-run-id=${last?.id ?? ""}>
                    ${last
                      ? html`<span><${Status} status=${last.status} />
                          <span title=${localTime(last.started_at)}> ${relative(last.started_at)}</span></span>`
                      : html`<span class="muted">never run</span>`}
                  </td>
                  <td data-label="Records sent per run">
                    <${Sparkline} runs=${runs} label=${`records delivered by the last ${runs.length} runs of ${mapping.name}`} />
                  </td>
                </tr>`;
              })}
            </tbody>
          </table>
        </div>`}
  `;
}

const seconds = (ms) => (ms == null ? "" : `${(ms / 1000).toFixed(ms < 10000 ? 1 : 0)} s`);

/** Polls `load` every 3 s while the page is visible; `load` says whether to keep going. */
function usePolling(load, deps) {
  useEffect(() => {
    let stopped = false;
    const tick = async () => {
      if (stopped) return;
      // `load` may ask for its next call sooner (a run page while the run goes).
      const next = document.visibilityState === "visible" ? await load() : undefined;
      if (!stopped) timer = setTimeout(tick, typeof next === "number" ? next : 3000);
    };
    let timer = setTimeout(tick, 0);
    return () => {
      stopped = true;
      clearTimeout(timer);
    };
  }, deps);
}

/** Asks the API `delay` ms after `key` last changed (a schedule, a mapping's action): the
 * answer as `{ok: true, ...answer}` or `{ok: false, error}`, or null until there is one (or
 * when `ask` returns null). Answers to keys since replaced are dropped. */
function useAsk(ask, key, delay) {
  const [answer, setAnswer] = useState(null);
  useEffect(() => {
    let current = true;
    const timer = setTimeout(async () => {
      try {
        const result = await ask();
        if (current) setAnswer(result === null ? null : { ok: true, ...result });
      } catch (e) {
        if (current) setAnswer({ ok: false, error: e.message });
      }
    }, delay);
    return () => {
      current = false;
      clearTimeout(timer);
    };
  }, [key]);
  return answer;
}

/** Counts and durations of a mapping's last runs, oldest first (uPlot, two scales). */
function RunsChart({ runs }) {
  const [node, setNode] = useState(null);
  useEffect(() => {
    if (!node || !window.uPlot || runs.length === 0) return undefined;
    const ordered = [...runs].reverse();
    const xs = ordered.map((r) => new Date(r.started_at).getTime() / 1000);
    const series = (pick) => ordered.map(pick);
    const width = Math.max(280, Math.min(node.clientWidth || 900, 1100));
    const plot = new window.uPlot(
      {
        width,
        height: 220,
        scales: { x: { time: true }, records: {}, seconds: {} },
        axes: [
          {},
          { scale: "records", label: "records" },
          { scale: "seconds", side: 1, label: "seconds", grid: { show: false } },
        ],
        series: [
          {},
          { label: "added", scale: "records", stroke: "#1c7c3a", width: 2 },
          { label: "updated", scale: "records", stroke: "#2451c9", width: 2 },
          { label: "deleted", scale: "records", stroke: "#a25b00", width: 2 },
          { label: "failed", scale: "records", stroke: "#a11b1b", width: 2 },
          { label: "duration (s)", scale: "seconds", stroke: "#8a8fa0", width: 1, dash: [4, 4] },
        ],
      },
      [
        xs,
        series((r) => r.counts.added),
        series((r) => r.counts.updated),
        series((r) => r.counts.deleted),
        series((r) => r.counts.failed),
        series((r) => (r.duration_ms ?? 0) / 1000),
      ],
      node,
    );
    // Follows the page's width (a phone turned, a window resized).
    const observer = new ResizeObserver(() => {
      const next = Math.max(280, Math.min(node.clientWidth, 1100));
      if (next !== plot.width) plot.setSize({ width: next, height: 220 });
    });
    observer.observe(node);
    return () => {
      observer.disconnect();
      plot.destroy();
    };
  }, [node, runs]);
  if (runs.length === 0) return null;
  return html`<div class="chart" ref=${setNode} role="img"
    aria-label=${`added, updated, deleted and failed records and durations of the last ${runs.length} runs`}></div>`;
}

/** A mapping's runs: a table and a chart of the last 30. */
function Runs({ mapping: chosen }) {
  const [mappings, listError] = useList("/mappings");
  const [runs, setRuns] = useState(null);
  const [runsError, setError] = useState(null);
  const error = listError ?? runsError;
  const mapping = chosen ?? mappings?.[0]?.name;

  usePolling(async () => {
    if (!mapping) return;
    try {
      const page = await api("GET", `/runs?mapping=${encodeURIComponent(mapping)}&limit=30`);
      setRuns(page.runs);
      setError(null);
    } catch (e) {
      setError(e.message);
    }
  }, [mapping]);

  if (error && !mappings) return html`<p class="error" role="alert">${error}</p>`;
  if (!mappings) return html`<p class="muted">Loading…</p>`;
  if (mappings.length === 0) {
    return html`<h1>Runs</h1>
      <div class="panel empty"><p><strong>No mappings, so no runs.</strong></p>
      <p class="muted">Runs appear here once <a href="#/new-mapping">a mapping</a> exists and runs.</p></div>`;
  }
  return html`
    <h1>Runs</h1>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <p>
      <label for="run-mapping">Mapping </label>
      <select id="run-mapping" value=${mapping}
        onChange=${(e) => { window.location.hash = `#/runs?mapping=${encodeURIComponent(e.currentTarget.value)}`; }}>
        ${mappings.map((m) => html`<option value=${m.name}>${m.name}</option>`)}
      </select>
    </p>
    ${runs === null
      ? html`<p class="muted">Loading…</p>`
      : runs.length === 0
        ? html`<div class="panel empty"><p><strong>${mapping} has not run yet.</strong></p>
            <p class="muted">Start a run from the command line (<code>sluice run ${mapping}</code>) or the API (<code>POST /api/v1/mappings/${mapping}/runs</code>).</p></div>`
        : html`
          <div class="panel"><${RunsChart} runs=${runs} /></div>
          <div class="panel">
            <table class="list runs">
              <thead><tr>
                <th scope="col">Status</th><th scope="col">Trigger</th><th scope="col">Started</th>
                <th scope="col">Duration</th><th scope="col" class="num">Extracted</th>
                <th scope="col" class="num">Added</th><th scope="col" class="num">Updated</th>
                <th scope="col" class="num">Deleted</th><th scope="col" class="num">Succeeded</th>
                <th scope="col" class="num">Failed</th>
              </tr></thead>
              <tbody>
                ${runs.map((r) => html`<tr key=${r.id} data-run=${r.id}>
                  <td data-label="Status"><a href=${`#/run/${r.id}`}><${Status} status=${r.status} /></a></td>
                  <td data-label="Trigger">${r.trigger}${r.full_resync ? " (full resync)" : ""}</td>
                  <td data-label="Started"><a href=${`#/run/${r.id}`}>${localTime(r.started_at)}</a></td>
                  <td data-label="Duration">${seconds(r.duration_ms)}</td>
                  <td data-label="Extracted" class="num">${number.format(r.counts.extracted)}</td>
                  <td data-label="Added" class="num">${number.format(r.counts.added)}</td>
                  <td data-label="Updated" class="num">${number.format(r.counts.updated)}</td>
                  <td data-label="Deleted" class="num">${number.format(r.counts.deleted)}</td>
                  <td data-label="Succeeded" class="num">${number.format(r.counts.delivered)}</td>
                  <td data-label="Failed" class="num">${number.format(r.counts.failed)}</td>
                </tr>`)}
              </tbody>
            </table>
          </div>`}
  `;
}

/** One run: its counts, stage timings and failed records. */
/** Where a running run is: extracting (rows read) or delivering (buckets, changes, records). */
function RunProgressPanel({ progress }) {
  return html`<section class="panel progress" aria-labelledby="progress-heading">
    <h2 id="progress-heading">Progress</h2>
    <div role="status" aria-live="polite">
      ${!progress
        ? html`<p class="muted">Starting… (a run made by another process reports its counts only when it ends)</p>`
        : progress.stage === "extracting"
          ? html`<p><strong>Extracting the model</strong>: ${number.format(progress.extracted_rows)} rows read.</p>`
          : html`<p><strong>Delivering</strong>: ${number.format(progress.buckets_done)} of ${number.format(progress.buckets)} buckets done (${number.format(progress.extracted_rows)} rows extracted).</p>
            <progress max=${progress.buckets} value=${progress.buckets_done} aria-label="Buckets delivered"></progress>
            <p class="small">So far ${number.format(progress.added)} added, ${number.format(progress.updated)} updated, ${number.format(progress.deleted)} deleted; ${number.format(progress.delivered)} delivered, ${number.format(progress.failed)} failed.</p>`}
    </div>
  </section>`;
}

function RunPage({ id }) {
  const [run, setRun] = useState(null);
  const [failures, setFailures] = useState(null);
  const [progress, setProgress] = useState(null);
  const [error, setError] = useState(null);
  usePolling(async () => {
    try {
      const loaded = await api("GET", `/runs/${encodeURIComponent(id)}`);
      setRun(loaded);
      if (loaded.status !== "running" || failures === null) {
        const page = await api("GET", `/runs/${encodeURIComponent(id)}/failures?limit=100`);
        setFailures(page);
      }
      setError(null);
      if (loaded.status === "running") {
        // Its counts are recorded when it ends; until then, what this server has seen of it.
        setProgress(await api("GET", `/mappings/${encodeURIComponent(loaded.mapping)}/progress`));
        return 1000;
      }
      setProgress(null);
    } catch (e) {
      setError(e.message);
    }
    return undefined;
  }, [id]);
  if (error && !run) return html`<p class="error" role="alert">${error}</p>`;
  if (!run) return html`<p class="muted">Loading…</p>`;
  const stages = [
    ["Extract", run.timings.extract_ms],
    ["Diff", run.timings.diff_ms],
    ["Read changed rows", run.timings.read_ms],
    ["Render", run.timings.render_ms],
    ["Send", run.timings.deliver_ms],
    ["Checkpoints", run.timings.checkpoint_ms],
  ];
  const counts = [
    ["Extracted", run.counts.extracted], ["Added", run.counts.added], ["Updated", run.counts.updated],
    ["Deleted", run.counts.deleted], ["Sent", run.counts.sent], ["Succeeded", run.counts.delivered],
    ["Failed", run.counts.failed], ["Retried", run.counts.retried], ["Skipped", run.counts.skipped],
  ];
  return html`
    <p><a href=${`#/runs?mapping=${encodeURIComponent(run.mapping)}`}>← ${run.mapping} runs</a></p>
    <h1>Run of ${run.mapping} <${Status} status=${run.status} /></h1>
    <p class="muted">${run.trigger}${run.full_resync ? ", full resync" : ""} · started ${localTime(run.started_at)}
      ${run.finished_at ? ` · ${seconds(run.duration_ms)}` : " · still running"} · <code>${run.id}</code></p>
    ${run.status === "running" && html`<${RunProgressPanel} progress=${progress} />`}
    ${run.error && html`<p class="error" role="alert">${run.error}</p>`}
    ${run.recommended_action && html`<p class="panel"><strong>Recommended action:</strong> ${run.recommended_action}</p>`}
    <div class="grid">
      <section class="panel" aria-labelledby="counts-heading">
        <h2 id="counts-heading">Records</h2>
        <table class="pairs">${counts.map(([k, v]) => html`<tr><th scope="row">${k}</th><td class="num">${number.format(v)}</td></tr>`)}</table>
      </section>
      <section class="panel" aria-labelledby="timings-heading">
        <h2 id="timings-heading">Stage timings</h2>
        <table class="pairs">${stages.map(([k, v]) => html`<tr><th scope="row">${k}</th><td class="num">${seconds(v)}</td></tr>`)}</table>
        <p class="muted small">Stages after extraction are summed over buckets and batches, and overlap.</p>
      </section>
    </div>
    <section class="panel" aria-labelledby="failures-heading">
      <h2 id="failures-heading">Failed records</h2>
      ${failures === null
        ? html`<p class="muted">Loading…</p>`
        : failures.failures.length === 0
          ? html`<p class="muted">${run.status === "running" ? "No failed records so far." : "No failed records: every selected record was delivered."}</p>`
          : html`
            <p><a class="button" href=${`/api/v1/runs/${encodeURIComponent(run.id)}/failures?format=csv`} download>Download errors (CSV)</a>
              ${failures.next_cursor ? html` <span class="muted">The first 100 are shown; the CSV has them all.</span>` : null}</p>
            <table class="list failures">
              <thead><tr><th scope="col">Key</th><th scope="col">Operation</th><th scope="col">Error</th>
                <th scope="col" class="num">Attempts</th><th scope="col">Payload</th></tr></thead>
              <tbody>
                ${failures.failures.map((f, i) => html`<tr key=${i}>
                  <td data-label="Key"><code>${typeof f.key === "string" ? f.key : JSON.stringify(f.key)}</code></td>
                  <td data-label="Operation">${f.operation}</td>
                  <td data-label="Error" class="wrap">${f.error}</td>
                  <td data-label="Attempts" class="num">${f.attempts}</td>
                  <td data-label="Payload">${f.payload
                    ? html`<details><summary>Sample payload</summary><pre>${f.payload}</pre></details>`
                    : html`<span class="muted">not sent</span>`}</td>
                </tr>`)}
              </tbody>
            </table>`}
    </section>
  `;
}

/** Every mapping, with a link to its page. */
function Mappings() {
  const [mappings, error] = useList("/mappings");
  if (error) return html`<p class="error" role="alert">${error}</p>`;
  if (!mappings) return html`<p class="muted">Loading…</p>`;
  return html`
    <h1>Mappings</h1>
    <p><a class="button" href="#/new-mapping">New mapping</a></p>
    ${mappings.length === 0
      ? html`<div class="panel empty"><p><strong>No mappings yet.</strong></p>
          <p class="muted">A mapping picks a model, a destination and which records (added, updated, deleted) go there with which fields. <a href="#/new-mapping">Make one</a>, or define it in <code>sluice.yaml</code>.</p></div>`
      : html`<div class="panel"><table class="list mappings">
          <thead><tr><th scope="col">Mapping</th><th scope="col">Model</th><th scope="col">Destination</th>
            <th scope="col">Sends</th><th scope="col">Enabled</th><th scope="col">Defined in</th></tr></thead>
          <tbody>${mappings.map((m) => html`<tr key=${m.name}>
            <td data-label="Mapping"><a href=${`#/mapping/${encodeURIComponent(m.name)}`}>${m.name}</a></td>
            <td data-label="Model">${m.definition.model}</td>
            <td data-label="Destination">${m.definition.destination}</td>
            <td data-label="Sends">${(m.definition.send ?? ["added", "updated", "deleted"]).join(", ")}</td>
            <td data-label="Enabled">${m.enabled === false ? "off" : "on"}</td>
            <td data-label="Defined in">${m.origin === "file" ? "sluice.yaml" : "the API"}</td>
          </tr>`)}</tbody></table></div>`}
  `;
}

/** The text a key value is compared as (`--key` in `sluice preview-payload`). */
const keyText = (value) => (typeof value === "string" ? value : JSON.stringify(value));

/** One mapping: its fields, its switch, Run now and Full resync, and a test-record panel. */
function MappingPage({ id: name }) {
  const [mapping, setMapping] = useState(null);
  const [model, setModel] = useState(null);
  const [rows, setRows] = useState(null);
  const [chosen, setChosen] = useState(0);
  const [op, setOp] = useState("added");
  const [payload, setPayload] = useState(null);
  const [busy, setBusy] = useState(false);
  const [message, setMessage] = useState(null);
  const [error, setError] = useState(null);

  const load = useCallback(async () => {
    try {
      const loaded = await api("GET", `/mappings/${encodeURIComponent(name)}`);
      setMapping(loaded);
      const modelDefinition = await api("GET", `/models/${encodeURIComponent(loaded.definition.model)}`);
      setModel(modelDefinition);
    } catch (e) {
      setError(e.message);
    }
  }, [name]);
  useEffect(() => { load(); }, [load]);

  const keyColumns = model
    ? [].concat(model.definition.primary_key ?? [])
    : [];

  const loadRows = async () => {
    setBusy(true);
    try {
      const preview = await api("POST", `/models/${encodeURIComponent(mapping.definition.model)}/preview`, { limit: 10 });
      setRows(preview);
      setChosen(0);
      setError(null);
    } catch (e) {
      setError(e.message);
    } finally {
      setBusy(false);
    }
  };

  const render_ = async () => {
    const row = rows.rows[chosen];
    setBusy(true);
    try {
      const result = await api("POST", `/mappings/${encodeURIComponent(name)}/test-record`, {
        key: keyColumns.map((k) => keyText(row[k])),
        op,
      });
      setPayload(result);
      setError(null);
    } catch (e) {
      setPayload(null);
      setError(e.message);
    } finally {
      setBusy(false);
    }
  };

  const trigger = async (full) => {
    if (full && !window.confirm(`Send every row of ${mapping.definition.model} to ${mapping.definition.destination} again as added?`)) return;
    setBusy(true);
    try {
      const run = await api("POST", `/mappings/${encodeURIComponent(name)}/runs`, full ? { full: true } : {});
      setMessage(html`${full ? "Full resync" : "Run"} started: <a href=${`#/run/${run.id}`}>follow it</a>.`);
      setError(null);
    } catch (e) {
      setMessage(null);
      setError(e.message);
    } finally {
      setBusy(false);
    }
  };

  const toggle = async (enabled) => {
    try {
      const updated = await api("PATCH", `/mappings/${encodeURIComponent(name)}`, { enabled });
      setMapping(updated);
      setMessage(`${name} is ${enabled ? "enabled" : "disabled"}.`);
      setError(null);
    } catch (e) {
      setError(e.message);
    }
  };

  if (error && !mapping) return html`<p class="error" role="alert">${error}</p>`;
  if (!mapping) return html`<p class="muted">Loading…</p>`;
  const d = mapping.definition;
  const fields = Object.entries(d.fields ?? {});
  const constants = Object.entries(d.constants ?? {});
  return html`
    <p><a href="#/mappings">← Mappings</a></p>
    <h1>${name}</h1>
    <p class="muted">${d.model} → ${d.destination} · sends ${(d.send ?? ["added", "updated", "deleted"]).join(", ")} · defined in ${mapping.origin === "file" ? "sluice.yaml" : "the API"}</p>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <p role="status" aria-live="polite">${message ?? ""}</p>
    <div class="actions">
      <label class="switch"><input type="checkbox" checked=${mapping.enabled !== false}
        aria-label=${`${name} enabled`} onChange=${(e) => toggle(e.currentTarget.checked)} />
        ${mapping.enabled !== false ? "Enabled" : "Disabled"}</label>
      <button type="button" disabled=${busy || mapping.enabled === false} onClick=${() => trigger(false)}>Run now</button>
      <button type="button" class="secondary" disabled=${busy || mapping.enabled === false} onClick=${() => trigger(true)}>Full resync</button>
      <a href=${`#/runs?mapping=${encodeURIComponent(name)}`}>Runs</a>
      <${DefinitionActions} kind="mappings" one="mapping" name=${name} origin=${mapping.origin} setError=${setError} />
    </div>
    <div class="grid">
      <section class="panel" aria-labelledby="fields-heading">
        <h2 id="fields-heading">Fields</h2>
        ${fields.length === 0 && constants.length === 0
          ? html`<p class="muted">No field mapping: the destination gets every model column under its own name.</p>`
          : html`<table class="pairs fields">
              <thead><tr><th scope="col">Model column</th><th scope="col">Destination field</th></tr></thead>
              <tbody>
                ${fields.map(([to, from]) => html`<tr><td>${typeof from === "string" ? from : JSON.stringify(from)}</td><td><code>${to}</code></td></tr>`)}
                ${constants.map(([to, value]) => html`<tr><td><span class="muted">constant</span> ${JSON.stringify(value)}</td><td><code>${to}</code></td></tr>`)}
              </tbody></table>`}
      </section>
      <section class="panel" aria-labelledby="test-heading">
        <h2 id="test-heading">Test record</h2>
        <p class="muted small">The exact request this mapping would send for one row of ${d.model}. Nothing is sent.</p>
        ${rows === null
          ? html`<button type="button" class="secondary" disabled=${busy} onClick=${loadRows}>Load rows of ${d.model}</button>`
          : html`<div class="controls">
            <label for="test-row">Row</label>
            <select id="test-row" value=${chosen} onChange=${(e) => setChosen(Number(e.currentTarget.value))}>
              ${rows.rows.map((row, i) => html`<option value=${i}>${keyColumns.map((k) => `${k} = ${keyText(row[k])}`).join(", ")}</option>`)}
            </select>
            <label for="test-op">as</label>
            <select id="test-op" value=${op} onChange=${(e) => setOp(e.currentTarget.value)}>
              <option value="added">added</option><option value="updated">updated</option><option value="deleted">deleted</option>
            </select>
            <button type="button" disabled=${busy || rows.rows.length === 0} onClick=${render_}>Show payload</button></div>`}
        ${payload && html`
          ${payload.unsendable && html`<p class="error" role="alert">Would fail unsent: ${payload.unsendable}</p>`}
          ${payload.requests.map((r) => html`<div class="request">
            <p><code>${r.method} ${r.target}</code></p>
            <pre class="payload" aria-label="payload">${typeof r.body === "string" ? r.body : JSON.stringify(r.body, null, 2)}</pre></div>`)}`}
      </section>
    </div>
  `;
}

/** Runs a history query; `accept` picks JSON lines or CSV. While this token's other query
 * holds its place (429), waits as `Retry-After` says and asks again, a few times, saying so
 * through `onWait`. */
async function query(sql, maxRows, accept, onWait = () => {}) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await request("POST", "/query", { sql, max_rows: maxRows }, accept);
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 429 || attempt >= 3) throw e;
      const seconds = Math.min(e.retryAfter ?? 2, 10);
      onWait(`${e.message} Asking again in ${seconds} s…`);
      await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
      onWait(null);
    }
  }
}

/** SQL over snapshot history, results as a table or a CSV download. */
function History() {
  const [sql, setSql] = useState("SELECT * FROM users_history ORDER BY _extracted_at DESC LIMIT 20");
  const [maxRows, setMaxRows] = useState(1000);
  const [result, setResult] = useState(null);
  const [tables, setTables] = useState(null);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const [waiting, setWaiting] = useState(null);

  useEffect(() => {
    // From the manifests, not a query: it takes no query's place from the user's own.
    api("GET", "/query/tables")
      .then((list) => setTables(list.map((t) => t.name)))
      .catch(() => setTables([]));
  }, []);

  const run = async () => {
    setBusy(true);
    setError(null);
    try {
      const response = await query(sql, maxRows, "application/x-ndjson", setWaiting);
      const rows = (await response.text()).split("\n").filter(Boolean).map((line) => JSON.parse(line));
      const columns = [];
      for (const row of rows) for (const key of Object.keys(row)) if (!columns.includes(key)) columns.push(key);
      setResult({ rows, columns });
    } catch (e) {
      setResult(null);
      setError(e.message);
    } finally {
      setBusy(false);
    }
  };

  const download = async () => {
    setBusy(true);
    try {
      const response = await query(sql, maxRows, "text/csv", setWaiting);
      const url = URL.createObjectURL(await response.blob());
      const link = document.createElement("a");
      link.href = url;
      link.download = "sluice-query.csv";
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      setError(e.message);
    } finally {
      setBusy(false);
    }
  };

  const cell = (value) =>
    value === null || value === undefined ? html`<span class="muted">null</span>` : typeof value === "object" ? JSON.stringify(value) : String(value);

  return html`
    <h1>Snapshot history</h1>
    <p class="muted">${"Each model is a table of its latest snapshot; "}<code>${"<model>_history"}</code>${" holds every snapshot, with "}<code>_snapshot_id</code>, <code>_run_id</code>${" and "}<code>_extracted_at</code>. Read-only.${" "}
      ${tables && tables.length > 0 ? html` Tables: ${tables.map((t, i) => html`${i ? ", " : ""}<code>${t}</code>`)}.` : null}</p>
    <div class="panel">
      <label for="history-sql">SQL</label>
      <textarea id="history-sql" class="sql" rows="5" spellcheck="false" value=${sql}
        onInput=${(e) => setSql(e.currentTarget.value)}
        onKeyDown=${(e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); run(); } }}></textarea>
      <div class="controls">
        <button type="button" disabled=${busy || !sql.trim()} onClick=${run}>Run query</button>
        <span class="muted small">Ctrl+Enter runs it.</span>
        <label for="history-max">Rows at most</label>
        <input id="history-max" type="number" min="1" max="1000000" value=${maxRows}
          onInput=${(e) => setMaxRows(Math.max(1, Number(e.currentTarget.value) || 1))} />
        <button type="button" class="secondary" disabled=${busy || !sql.trim()} onClick=${download}>Download CSV</button>
      </div>
    </div>
    ${waiting && html`<p class="muted" aria-live="polite">${waiting}</p>`}
    ${error && html`<p class="error" role="alert">${error}</p>`}
    ${result && html`<div class="panel results">
      <p class="muted" role="status">${number.format(result.rows.length)} row${result.rows.length === 1 ? "" : "s"}</p>
      ${result.rows.length > 0 && html`<div class="scroll"><table class="list grid-table">
        <thead><tr>${result.columns.map((c) => html`<th scope="col">${c}</th>`)}</tr></thead>
        <tbody>${result.rows.map((row, i) => html`<tr key=${i}>${result.columns.map((c) => html`<td data-label=${c}>${cell(row[c])}</td>`)}</tr>`)}</tbody>
      </table></div>`}
    </div>`}
  `;
}

/** Sources or destinations: each one's type, where it is defined, and a connection test. */
// ---- Forms from JSON Schema ----------------------------------------------------------------
// Source, destination and mapping options are described by the API (GET /connectors) as JSON
// Schema generated from the types sluice parses them into; these widgets walk that schema, so
// a form cannot ask for an option the server would refuse, and needs no list kept here.

/** What the API shows a stored secret as. */
const REDACTED = "********";

let catalogLoad = null;
/** The connector types of this server (loaded once a page). */
function connectorCatalog() {
  catalogLoad ??= api("GET", "/connectors").catch((e) => {
    catalogLoad = null;
    throw e;
  });
  return catalogLoad;
}

/** A schema without its "or null" (`Option<T>` is `anyOf [T, null]` or `type: [t, "null"]`). */
function unwrap(schema) {
  let s = schema && typeof schema === "object" ? schema : {};
  for (const key of ["anyOf", "oneOf"]) {
    if (!Array.isArray(s[key])) continue;
    const rest = s[key].filter((branch) => branch.type !== "null");
    if (rest.length === 1) {
      const { [key]: _, ...outer } = s;
      s = { ...rest[0], ...outer, description: outer.description ?? rest[0].description };
    } else if (rest.length < s[key].length) {
      s = { ...s, [key]: rest };
    }
  }
  if (Array.isArray(s.type)) {
    const types = s.type.filter((t) => t !== "null");
    s = { ...s, type: types.length === 1 ? types[0] : types };
  }
  return s;
}

/** The values of an enumeration (`enum`, or `oneOf` documented constants), else null. */
function choicesOf(s) {
  if (Array.isArray(s.enum)) return s.enum.filter((v) => v !== null).map((value) => ({ value, description: "" }));
  const branches = s.oneOf ?? s.anyOf;
  if (Array.isArray(branches) && branches.length > 0 && branches.every((b) => "const" in b || Array.isArray(b.enum))) {
    return branches.flatMap((b) => ("const" in b ? [b.const] : b.enum).map((value) => ({ value, description: b.description ?? "" })));
  }
  return null;
}

const takesString = (s) => s.type === "string" || (Array.isArray(s.type) && s.type.includes("string"))
  || (Array.isArray(s.anyOf) && s.anyOf.some((b) => takesString(unwrap(b))));

/** Which widget edits a value of `schema`. */
function widgetOf(schema) {
  const s = unwrap(schema);
  if (choicesOf(s)) return "choice";
  if (s.type === "boolean") return "boolean";
  if (s.type === "integer" || s.type === "number") return "number";
  if (s.type === "object" && s.properties) return "object";
  if (s.type === "object" && s.additionalProperties && typeof s.additionalProperties === "object") {
    return ["text", "number"].includes(widgetOf(s.additionalProperties)) ? "map" : "json";
  }
  if (s.type === "array" && widgetOf(s.items) === "text") return "lines";
  if (takesString(s)) return "text";
  return "json";
}

/** `value` without empty strings, nulls and empty objects or lists: options left unset. */
function pruned(value) {
  if (Array.isArray(value)) return value.length === 0 ? undefined : value;
  if (value && typeof value === "object") {
    const kept = Object.entries(value)
      .map(([k, v]) => [k, pruned(v)])
      .filter(([, v]) => v !== undefined);
    return kept.length === 0 ? undefined : Object.fromEntries(kept);
  }
  return value === "" || value === null ? undefined : value;
}

const hasDefault = (d) => d !== undefined && d !== null && !(typeof d === "object" && Object.keys(d).length === 0);
const describe = (s) => [s.description, hasDefault(s.default) && !/default/i.test(s.description ?? "") ? `Default: ${JSON.stringify(s.default)}.` : ""]
  .filter(Boolean).join(" ");

/** A map entry's value as text: a string as it is, anything else (a `files` table spec) as JSON. */
const shownValue = (value) => (typeof value === "string" ? value : JSON.stringify(value));
/** What was typed into a map entry: a stored secret left empty stays stored, and text that
 * was JSON (an object or a list) stays JSON. */
function typedValue(text, before) {
  if (text === "") return before === REDACTED ? REDACTED : "";
  if (typeof before !== "string" && /^[[{]/.test(text.trim())) {
    try { return JSON.parse(text); } catch { /* not JSON yet: kept as typed */ }
  }
  return text;
}

/** Key/value rows of a map option (`headers`, object storage `options`, ...). */
function MapEditor({ id, label, schema, value, onChange, describedBy }) {
  const [rows, setRows] = useState(() => Object.entries(value ?? {}).map(([k, v]) => ({ key: k, value: v })));
  const item = unwrap(schema.additionalProperties);
  const secret = item.writeOnly === true;
  const update = (next) => {
    setRows(next);
    onChange(Object.fromEntries(next.filter((r) => r.key.trim()).map((r) => [r.key.trim(), r.value])));
  };
  return html`<div class="map-editor" role="group" aria-labelledby=${`${id}-name`} aria-describedby=${describedBy}>
    ${rows.map((row, i) => html`<div class="map-row" key=${i}>
      <input aria-label=${`${label} ${i + 1} name`} value=${row.key} placeholder="name"
        onInput=${(e) => update(rows.map((r, j) => (j === i ? { ...r, key: e.currentTarget.value } : r)))} />
      <input aria-label=${`${label} ${i + 1} value`} type=${secret ? "password" : "text"} autocomplete="off"
        value=${row.value === REDACTED ? "" : shownValue(row.value)} placeholder=${row.value === REDACTED ? "stored; type to replace" : "value"}
        onInput=${(e) => update(rows.map((r, j) => (j === i ? { ...r, value: typedValue(e.currentTarget.value, r.value) } : r)))} />
      <button type="button" class="secondary" aria-label=${`Remove ${label} ${i + 1}`}
        onClick=${() => update(rows.filter((_, j) => j !== i))}>Remove</button></div>`)}
    <button type="button" class="secondary" onClick=${() => update([...rows, { key: "", value: "" }])}>Add ${label}</button>
  </div>`;
}

/** A JSON text for options no simpler widget fits (lists of objects, either-or shapes). */
function JsonField({ id, value, onChange, describedBy }) {
  const [text, setText] = useState(value === undefined ? "" : JSON.stringify(value, null, 2));
  return html`<textarea id=${id} class="json" rows="4" spellcheck="false" aria-describedby=${describedBy} value=${text}
    onInput=${(e) => {
      const next = e.currentTarget.value;
      setText(next);
      if (!next.trim()) {
        e.currentTarget.setCustomValidity("");
        onChange(undefined);
        return;
      }
      try {
        onChange(JSON.parse(next));
        e.currentTarget.setCustomValidity("");
      } catch {
        e.currentTarget.setCustomValidity("Not JSON yet");
      }
    }}></textarea>`;
}

/** One option: its label (the name sluice.yaml uses), widget and help. */
function OptionField({ name, path, schema, required, value, onChange }) {
  const s = unwrap(schema);
  const kind = widgetOf(s);
  const id = `option-${path.join("-")}`;
  const help = describe(s);
  const helpId = help ? `${id}-help` : undefined;
  // The asterisk is outside the label, so the field's name is the option's name alone.
  // A map's rows have labels of their own; its name labels the group, not a control.
  const label = html`<span class="option-label">${kind === "map"
    ? html`<span id=${`${id}-name`}><code>${name}</code></span>`
    : html`<label for=${id}><code>${name}</code></label>`}${required && html`<span class="required" aria-hidden="true"> *</span>`}</span>`;
  const helpText = help && html`<p id=${helpId} class="muted small help">${help}</p>`;

  if (kind === "object") {
    const body = html`<${OptionFields} schema=${s} path=${path} value=${value ?? {}} onChange=${onChange} />`;
    return html`<div class="option wide">${required
      ? html`<fieldset><legend><code>${name}</code></legend>${helpText}${body}</fieldset>`
      : html`<details open=${value !== undefined && Object.keys(value).length > 0}><summary><code>${name}</code>
          <span class="muted small">${s.description ?? ""}</span></summary>${body}</details>`}</div>`;
  }
  let widget;
  if (kind === "choice") {
    const choices = choicesOf(s);
    widget = html`<select id=${id} required=${required} aria-describedby=${helpId} value=${value ?? ""}
      onChange=${(e) => onChange(e.currentTarget.value === "" ? undefined : e.currentTarget.value)}>
      ${!required && html`<option value="">${s.default != null ? `default (${s.default})` : "not set"}</option>`}
      ${required && value === undefined && html`<option value="">choose…</option>`}
      ${choices.map((c) => html`<option value=${c.value}>${c.value}${c.description ? ` — ${c.description}` : ""}</option>`)}</select>`;
  } else if (kind === "boolean") {
    widget = html`<select id=${id} aria-describedby=${helpId} value=${value === undefined ? "" : String(value)}
      onChange=${(e) => onChange(e.currentTarget.value === "" ? undefined : e.currentTarget.value === "true")}>
      <option value="">${s.default != null ? `default (${s.default ? "yes" : "no"})` : "not set"}</option>
      <option value="true">yes</option><option value="false">no</option></select>`;
  } else if (kind === "number") {
    widget = html`<input id=${id} type="number" required=${required} aria-describedby=${helpId}
      min=${s.minimum} max=${s.maximum} step=${s.type === "integer" ? 1 : "any"} value=${value ?? ""}
      placeholder=${s.default ?? ""}
      onInput=${(e) => onChange(e.currentTarget.value === "" ? undefined : Number(e.currentTarget.value))} />`;
  } else if (kind === "text") {
    const secret = s.writeOnly === true;
    const stored = value === REDACTED;
    widget = html`<input id=${id} type=${secret ? "password" : "text"} autocomplete=${secret ? "new-password" : "off"}
      required=${required && !stored} aria-describedby=${helpId} spellcheck="false"
      value=${stored ? "" : value ?? ""}
      placeholder=${stored ? "stored; type to replace" : hasDefault(s.default) ? String(s.default) : ""}
      onInput=${(e) => onChange(e.currentTarget.value === "" ? (stored ? REDACTED : undefined) : e.currentTarget.value)} />`;
  } else if (kind === "lines") {
    widget = html`<textarea id=${id} rows="3" aria-describedby=${helpId} value=${(value ?? []).join("\n")}
      onInput=${(e) => onChange(e.currentTarget.value.split("\n").map((l) => l.trim()).filter(Boolean))}></textarea>`;
  } else if (kind === "map") {
    widget = html`<${MapEditor} id=${id} label=${name} schema=${s} value=${value} onChange=${onChange} describedBy=${helpId} />`;
  } else {
    widget = html`<${JsonField} id=${id} value=${value} onChange=${onChange} describedBy=${helpId} />`;
  }
  return html`<div class="option">${label}<div class="option-input">${widget}${helpText}</div></div>`;
}

/** Every option of an object schema: the required ones first, nested groups folded. */
function OptionFields({ schema, path = [], value, onChange }) {
  const required = new Set(schema.required ?? []);
  const entries = Object.entries(schema.properties ?? {});
  const order = (entry) => (required.has(entry[0]) ? 0 : widgetOf(entry[1]) === "object" ? 2 : 1);
  const sorted = entries.map((e, i) => [e, i]).sort((a, b) => order(a[0]) - order(b[0]) || a[1] - b[1]).map(([e]) => e);
  return html`<div class="options">${sorted.map(([name, property]) => html`<${OptionField} key=${name} name=${name}
    path=${[...path, name]} schema=${property} required=${required.has(name)} value=${value?.[name]}
    onChange=${(next) => onChange({ ...value, [name]: next })} />`)}</div>`;
}

const SINGULAR = { sources: "source", destinations: "destination" };

/** The `name: value` lines of a definition's options, nested ones dotted. */
function optionLines(value, prefix = "") {
  return Object.entries(value ?? {}).flatMap(([k, v]) =>
    v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length > 0
      ? optionLines(v, `${prefix}${k}.`)
      : [[`${prefix}${k}`, typeof v === "string" ? v : JSON.stringify(v)]]);
}

/** Sources or destinations: each with its type, where it is defined, and a connection test. */
function Connections({ kind, title, what }) {
  const [items, error] = useList(`/${kind}`);
  const [tests, setTests] = useState({});
  const one = SINGULAR[kind];

  const test = async (name) => {
    setTests((t) => ({ ...t, [name]: { running: true } }));
    const result = await testConnection(kind, name);
    setTests((t) => ({ ...t, [name]: result }));
  };

  if (error) return html`<p class="error" role="alert">${error}</p>`;
  if (!items) return html`<p class="muted">Loading…</p>`;
  return html`
    <h1>${title}</h1>
    <p><a class="button" href=${`#/new-${one}`}>Add ${one}</a></p>
    ${items.length === 0
      ? html`<div class="panel empty"><p><strong>No ${kind} yet.</strong></p>
          <p class="muted">${what} <a href=${`#/new-${one}`}>Add one</a>, or define it in <code>sluice.yaml</code>.</p></div>`
      : html`<div class="panel"><table class=${`list ${kind}`}>
          <thead><tr><th scope="col">Name</th><th scope="col">Type</th><th scope="col">Defined in</th>
            <th scope="col">Connection</th></tr></thead>
          <tbody>${items.map((item) => {
            const result = tests[item.name];
            return html`<tr key=${item.name} data-name=${item.name}>
              <td data-label="Name"><a href=${`#/${one}/${encodeURIComponent(item.name)}`}><strong>${item.name}</strong></a>
                ${item.problem && html`<br /><span class="error small">${item.problem}</span>`}</td>
              <td data-label="Type">${item.definition.type}</td>
              <td data-label="Defined in">${item.origin === "file" ? "sluice.yaml" : "the API"}</td>
              <td data-label="Connection">
                <button type="button" class="secondary" disabled=${result?.running}
                  aria-label=${`Test connection to ${item.name}`} onClick=${() => test(item.name)}>Test connection</button>
                <${TestOutcome} result=${result} />
              </td>
            </tr>`;
          })}</tbody></table></div>`}
  `;
}

/** Runs a source's or destination's connection test; its own error when it fails. */
async function testConnection(kind, name) {
  try {
    return await api("POST", `/${kind}/${encodeURIComponent(name)}/test`);
  } catch (e) {
    return { ok: false, error: e.message };
  }
}

function TestOutcome({ result }) {
  return html`<div role="status" aria-live="polite" class="test-result">
    ${result?.running && html`<span class="muted small">connecting…</span>`}
    ${result && !result.running && (result.ok
      ? html`<span class="status succeeded">connected</span>`
      : html`<span class="error small">${result.error}</span>`)}
  </div>`;
}

/** Deletes an API-made definition after asking; where to go after, or the API's refusal. */
async function removeDefinition(kind, one, name, then, setError) {
  if (!window.confirm(`Delete the ${one} ${name}?`)) return;
  try {
    await api("DELETE", `/${kind}/${encodeURIComponent(name)}`);
    window.location.hash = then;
  } catch (e) {
    setError(e.message);
  }
}

/** Edit and Delete for a definition made through the API; a note for one from the file. */
function DefinitionActions({ kind, one, name, origin, setError }) {
  if (origin === "file") return html`<span class="muted small">Defined in <code>sluice.yaml</code>: change it there.</span>`;
  return html`<a class="button secondary" href=${`#/edit-${one}/${encodeURIComponent(name)}`}>Edit</a>
    <button type="button" class="secondary" onClick=${() => removeDefinition(kind, one, name, `#/${kind}`, setError)}>Delete</button>`;
}

/** One source or destination: its options (secrets as the API shows them: never), a
 * connection test (run at once after it was saved), and Edit and Delete for API-made ones. */
function ConnectionPage({ kind, id: name, query: params }) {
  const one = SINGULAR[kind];
  const [item, setItem] = useState(null);
  const [entry, setEntry] = useState(null);
  const [result, setResult] = useState(null);
  const [error, setError] = useState(null);

  const test = async () => {
    setResult({ running: true });
    setResult(await testConnection(kind, name));
  };
  useEffect(() => {
    Promise.all([api("GET", `/${kind}/${encodeURIComponent(name)}`), connectorCatalog()])
      .then(([loaded, catalog]) => {
        setItem(loaded);
        setEntry(catalog[kind].find((c) => c.type === loaded.definition.type) ?? null);
      })
      .catch((e) => setError(e.message));
    if (params?.get("test")) test();
  }, [kind, name]);

  if (!item) return error ? html`<p class="error" role="alert">${error}</p>` : html`<p class="muted">Loading…</p>`;
  const { type, ...options } = item.definition;
  return html`
    <p><a href=${`#/${kind}`}>← ${kind === "sources" ? "Sources" : "Destinations"}</a></p>
    <h1>${name}</h1>
    <p class="muted">${entry?.title ?? type} · defined in ${item.origin === "file" ? "sluice.yaml" : "the API"}${entry ? html` · ${entry.summary}` : ""}</p>
    ${item.problem && html`<p class="error" role="alert">${item.problem}</p>`}
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <div class="actions">
      <button type="button" disabled=${result?.running} onClick=${test}>Test connection</button>
      <${DefinitionActions} kind=${kind} one=${one} name=${name} origin=${item.origin} setError=${setError} />
    </div>
    <${TestOutcome} result=${result} />
    <section class="panel" aria-labelledby="options-heading">
      <h2 id="options-heading">Options</h2>
      <table class="pairs option-values"><tbody>
        <tr><th scope="row"><code>type</code></th><td><code>${type}</code></td></tr>
        ${optionLines(options).map(([k, v]) => html`<tr><th scope="row"><code>${k}</code></th><td class="wrap"><code>${v}</code></td></tr>`)}
      </tbody></table>
    </section>
  `;
}

/** A new source or destination, or an API-made one edited: its type's own options form. */
function ConnectionForm({ kind, id: editing, query: params }) {
  const one = SINGULAR[kind];
  const [catalog, setCatalog] = useState(null);
  const [name, setName] = useState(editing || "");
  const [type, setType] = useState("");
  const [options, setOptions] = useState({});
  // Remounts the fields when the type changes or an edited definition arrives.
  const [generation, setGeneration] = useState(0);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const [tested, setTested] = useState(null);

  useEffect(() => {
    const loads = [connectorCatalog(), editing ? api("GET", `/${kind}/${encodeURIComponent(editing)}`) : null];
    Promise.all(loads)
      .then(([loaded, item]) => {
        setCatalog(loaded);
        if (item) {
          const { type: t, ...rest } = item.definition;
          setType(t);
          setOptions(rest);
        } else {
          // `?type=postgres` opens the form on a type.
          const asked = params?.get("type");
          setType(loaded[kind].some((c) => c.type === asked) ? asked : loaded[kind][0]?.type ?? "");
        }
        setGeneration((g) => g + 1);
      })
      .catch((e) => setError(e.message));
  }, [kind, editing]);

  const entry = catalog?.[kind].find((c) => c.type === type);
  const definition = { type, ...(pruned(options) ?? {}) };

  // Tries the options as they are in the form, before anything is saved.
  const testDraft = async () => {
    setTested({ running: true });
    try {
      setTested(await api("POST", "/connection-tests", { kind: one, name: (editing || name.trim()) || "draft", definition }));
    } catch (e) {
      setTested({ ok: false, error: e.message });
    }
  };

  const submit = async (event) => {
    event.preventDefault();
    setBusy(true);
    try {
      if (editing) await api("PUT", `/${kind}/${encodeURIComponent(editing)}`, { definition });
      else await api("POST", `/${kind}`, { name: name.trim(), definition });
      window.location.hash = `#/${one}/${encodeURIComponent(editing || name.trim())}?test=1`;
    } catch (e) {
      setError(e.message);
    } finally {
      setBusy(false);
    }
  };

  if (!catalog) return error ? html`<p class="error" role="alert">${error}</p>` : html`<p class="muted">Loading…</p>`;
  const heading = editing ? `Edit ${editing}` : `Add ${one}`;
  return html`
    <p><a href=${editing ? `#/${one}/${encodeURIComponent(editing)}` : `#/${kind}`}>← ${editing || (kind === "sources" ? "Sources" : "Destinations")}</a></p>
    <h1>${heading}</h1>
    <form class="panel form" onSubmit=${submit}>
      <div class="form-grid">
        <label for="connection-name">Name</label>
        <input id="connection-name" required pattern="[A-Za-z_][A-Za-z0-9_\-]*" maxlength="64" value=${name}
          disabled=${Boolean(editing)} onInput=${(e) => setName(e.currentTarget.value)} />
        <label for="connection-type">Type</label>
        <select id="connection-type" value=${type} disabled=${Boolean(editing)}
          onChange=${(e) => { setType(e.currentTarget.value); setOptions({}); setGeneration((g) => g + 1); }}>
          ${catalog[kind].map((c) => html`<option value=${c.type}>${c.title}</option>`)}</select>
      </div>
      ${entry && html`<p class="muted">${entry.summary}</p>`}
      <fieldset>
        <legend>${entry?.title ?? type} options</legend>
        <p class="muted small">Names as <code>sluice.yaml</code> writes them; <span class="required">*</span> is required. Secrets are sealed when saved and never shown again. Values are taken as typed (<code>$${"{VAR}"}</code> is expanded only in <code>sluice.yaml</code>).</p>
        ${entry && html`<${OptionFields} key=${`${type}-${generation}`} schema=${entry.options} value=${options} onChange=${setOptions} />`}
      </fieldset>
      <details><summary>As JSON</summary><pre class="definition">${JSON.stringify(definition, null, 2)}</pre></details>
      ${error && html`<p class="error" role="alert">${error}</p>`}
      <div class="actions">
        <button type="submit" disabled=${busy}>${editing ? "Save" : `Add ${one}`}</button>
        <button type="button" class="secondary" disabled=${tested?.running} onClick=${testDraft}>Test connection</button>
        <${TestOutcome} result=${tested} />
      </div>
    </form>
  `;
}

const Sources = () => html`<${Connections} kind="sources" title="Sources"
  what="A source is a database, warehouse or set of files that models query." />`;
const Destinations = () => html`<${Connections} kind="destinations" title="Destinations"
  what="A destination is a business tool, database, webhook or file that mappings send records to." />`;

const SQL_KEYWORDS = new Set(
  ("select from where and or not as on join left right full inner outer cross group by order having limit offset " +
    "union all distinct case when then else end is null in like ilike between with asc desc true false cast " +
    "exists insert update delete over partition coalesce interval date timestamp").split(" "),
);

/** SQL split into highlighted spans: keywords, strings, numbers, comments. */
function highlightSql(sql) {
  const tokens = [];
  const pattern = /(--[^\n]*)|('(?:[^']|'')*')|("(?:[^"]|"")*")|(\b\d+(?:\.\d+)?\b)|([A-Za-z_][A-Za-z0-9_]*)|(\{\{[^}]*\}\})|(\s+|.)/g;
  let match;
  while ((match = pattern.exec(sql)) !== null) {
    const [text, comment, string, quoted, num, word, template] = match;
    if (comment) tokens.push(html`<span class="sql-comment">${text}</span>`);
    else if (string) tokens.push(html`<span class="sql-string">${text}</span>`);
    else if (quoted) tokens.push(html`<span class="sql-ident">${text}</span>`);
    else if (num) tokens.push(html`<span class="sql-number">${text}</span>`);
    else if (word && SQL_KEYWORDS.has(word.toLowerCase())) tokens.push(html`<span class="sql-keyword">${text}</span>`);
    else if (template) tokens.push(html`<span class="sql-template">${text}</span>`);
    else tokens.push(text);
  }
  return tokens;
}

/** A preview's rows under their column names and types; key columns marked. */
function PreviewTable({ preview, keys = [] }) {
  return html`<div class="scroll"><table class="list preview">
    <thead><tr>${preview.columns.map((c) => html`<th scope="col">
      <span class="column-name">${c.name}</span>${keys.includes(c.name) ? " (key)" : ""}<br /><span class="muted small column-type">${c.type}</span></th>`)}</tr></thead>
    <tbody>${preview.rows.map((row, i) => html`<tr key=${i}>${preview.columns.map((c) => html`<td data-label=${c.name}>${row[c.name] === null ? html`<span class="muted">null</span>` : String(row[c.name])}</td>`)}</tr>`)}</tbody>
  </table></div>`;
}

/** Every model. */
function Models() {
  const [models, error] = useList("/models");
  if (error) return html`<p class="error" role="alert">${error}</p>`;
  if (!models) return html`<p class="muted">Loading…</p>`;
  return html`
    <h1>Models</h1>
    <p><a class="button" href="#/new-model">New model</a></p>
    ${models.length === 0
      ? html`<div class="panel empty"><p><strong>No models yet.</strong></p>
          <p class="muted">A model is a SQL query against a source, with a primary key. <a href="#/new-model">Write one</a>, or define it in <code>sluice.yaml</code>.</p></div>`
      : html`<div class="panel"><table class="list models">
          <thead><tr><th scope="col">Model</th><th scope="col">Source</th><th scope="col">Primary key</th><th scope="col">Defined in</th></tr></thead>
          <tbody>${models.map((m) => html`<tr key=${m.name}>
            <td data-label="Model"><a href=${`#/model/${encodeURIComponent(m.name)}`}>${m.name}</a></td>
            <td data-label="Source">${m.definition.source}</td>
            <td data-label="Primary key">${[].concat(m.definition.primary_key ?? []).join(", ")}</td>
            <td data-label="Defined in">${m.origin === "file" ? "sluice.yaml" : "the API"}</td>
          </tr>`)}</tbody></table></div>`}
  `;
}

/** One model: its SQL, highlighted, and a preview of its first rows with their types. */
function ModelPage({ id: name }) {
  const [model, setModel] = useState(null);
  const [preview, setPreview] = useState(null);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  useEffect(() => {
    api("GET", `/models/${encodeURIComponent(name)}`).then(setModel).catch((e) => setError(e.message));
  }, [name]);
  const runPreview = async () => {
    setBusy(true);
    try {
      setPreview(await api("POST", `/models/${encodeURIComponent(name)}/preview`, { limit: 10 }));
      setError(null);
    } catch (e) {
      setPreview(null);
      setError(e.message);
    } finally {
      setBusy(false);
    }
  };
  if (error && !model) return html`<p class="error" role="alert">${error}</p>`;
  if (!model) return html`<p class="muted">Loading…</p>`;
  const d = model.definition;
  const keys = [].concat(d.primary_key ?? []);
  return html`
    <p><a href="#/models">← Models</a></p>
    <h1>${name}</h1>
    <p class="muted">from ${d.source} · primary key ${keys.length > 0 ? keys.join(", ") : d.dbt_model ? "from dbt" : ""} · defined in ${model.origin === "file" ? "sluice.yaml" : "the API"}</p>
    <div class="actions"><${DefinitionActions} kind="models" one="model" name=${name} origin=${model.origin} setError=${setError} /></div>
    <section class="panel" aria-labelledby="sql-heading">
      <h2 id="sql-heading">${d.dbt_model ? "dbt model" : "SQL"}</h2>
      ${d.dbt_model
        ? html`<p>Reads the relation dbt builds for <code>${d.dbt_model}</code>, as the manifest names it.</p>`
        : html`<pre class="sql" aria-label="SQL">${highlightSql(d.sql ?? "")}</pre>`}
      <button type="button" disabled=${busy} onClick=${runPreview}>Preview</button>
      <span class="muted small"> The first 10 rows and their column types; no snapshot is written.</span>
    </section>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    ${preview && html`<section class="panel results" aria-labelledby="preview-heading">
      <h2 id="preview-heading">Preview</h2>
      <${PreviewTable} preview=${preview} keys=${keys} />
    </section>`}
  `;
}

const WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/** A schedule picker: manual, an interval, weekdays at a time, cron, after other mappings, or
 * after dbt; with its next five runs. */
function SchedulePicker({ value, onChange }) {
  // `value`, a schedule as sluice.yaml writes it, is where the picker starts.
  const start = value && typeof value === "object" ? value : {};
  const [mode, setMode] = useState(start.after_dbt ? "after_dbt" : start.after ? "after" : start.every ? "every" : start.cron ? "cron" : start.at ? "days" : "manual");
  const [after, setAfter] = useState(start.after ?? []);
  // dbt Cloud jobs (ids or names) for `after_dbt`; none: whenever dbt builds the model's models.
  const [dbtJobs, setDbtJobs] = useState((start.after_dbt?.jobs ?? []).join(", "));
  const jobs = dbtJobs.split(",").map((j) => j.trim()).filter(Boolean).map((j) => (/^\d+$/.test(j) ? Number(j) : j));
  // The mappings a sequence may follow, loaded when that mode is picked.
  const [mappingNames, setMappingNames] = useState(null);
  useEffect(() => {
    if (mode !== "after" || mappingNames) return;
    all("/mappings").then((m) => setMappingNames(m.map((x) => x.name))).catch(() => setMappingNames([]));
  }, [mode]);
  const [every, setEvery] = useState(start.every ?? "1h");
  // Days and a time with no `days` is every day.
  const [days, setDays] = useState(start.days ?? (start.at ? WEEKDAYS : ["mon", "tue", "wed", "thu", "fri"]));
  const [at, setAt] = useState(start.at ?? "09:00");
  const [cron, setCron] = useState(start.cron ?? "0 */2 * * *");
  const [timezone, setTimezone] = useState(start.timezone ?? (Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC"));

  const schedule =
    mode === "manual" ? "manual"
      : mode === "after" ? { after }
      : mode === "after_dbt" ? { after_dbt: jobs.length > 0 ? { jobs } : true }
      : mode === "every" ? { every }
        : mode === "days" ? { days, at, timezone }
          : { cron, timezone };
  const key = JSON.stringify(schedule);
  useEffect(() => onChange(schedule), [key]);
  const preview = useAsk(() => api("POST", "/schedules/preview", { schedule, count: 5 }), key, 250);

  return html`<fieldset class="schedule">
    <legend>Schedule</legend>
    <div class="controls">
      <label for="schedule-mode">Runs</label>
      <select id="schedule-mode" value=${mode} onChange=${(e) => setMode(e.currentTarget.value)}>
        <option value="manual">only on demand</option>
        <option value="every">at an interval</option>
        <option value="days">on days at a time</option>
        <option value="cron">on a cron expression</option>
        <option value="after">after other mappings succeed</option>
        <option value="after_dbt">after dbt builds its data</option>
      </select>
      ${mode === "after_dbt" && html`<label for="schedule-dbt-jobs">dbt Cloud jobs</label>
        <input id="schedule-dbt-jobs" value=${dbtJobs} size="24" placeholder="any (ids or names, comma-separated)"
          onInput=${(e) => setDbtJobs(e.currentTarget.value)} />`}
      ${mode === "after" && html`<span role="group" aria-label="After mappings">${[...new Set([...(mappingNames ?? []), ...after])].map((m) => html`<label class="day">
          <input type="checkbox" checked=${after.includes(m)}
            onChange=${(e) => setAfter(e.currentTarget.checked ? [...after, m] : after.filter((x) => x !== m))} />${m}</label>`)}</span>`}
      ${mode === "every" && html`<label for="schedule-every">every</label>
        <input id="schedule-every" value=${every} size="6" onInput=${(e) => setEvery(e.currentTarget.value)} />`}
      ${mode === "days" && html`<span role="group" aria-label="Days">${WEEKDAYS.map((d) => html`<label class="day">
          <input type="checkbox" checked=${days.includes(d)}
            onChange=${(e) => setDays(e.currentTarget.checked ? WEEKDAYS.filter((w) => w === d || days.includes(w)) : days.filter((w) => w !== d))} />${d}</label>`)}</span>
        <label for="schedule-at">at</label>
        <input id="schedule-at" type="time" value=${at} onInput=${(e) => setAt(e.currentTarget.value)} />`}
      ${mode === "cron" && html`<label for="schedule-cron">cron</label>
        <input id="schedule-cron" value=${cron} size="16" onInput=${(e) => setCron(e.currentTarget.value)} />`}
      ${(mode === "days" || mode === "cron") && html`<label for="schedule-tz">time zone</label>
        <input id="schedule-tz" value=${timezone} size="18" onInput=${(e) => setTimezone(e.currentTarget.value)} />`}
    </div>
    <div role="status" aria-live="polite" class="schedule-preview">
      ${preview && (preview.ok
        ? html`<p><strong>${preview.description}</strong></p>
            ${preview.next_runs.length > 0
              ? html`<p class="muted small">Next runs (your time zone):</p>
                  <ol class="next-runs">${preview.next_runs.map((t) => html`<li>${localTime(t)}</li>`)}</ol>`
              : mode === "after"
                ? html`<p class="muted small">Runs once each of these has succeeded since it last ran (and by hand or through the API).</p>`
              : mode === "after_dbt"
                ? html`<p class="muted small">${jobs.length > 0
                    ? "Runs when one of these dbt Cloud jobs succeeds (its webhook, POST /api/v1/triggers/dbt)."
                    : "Runs when a dbt build has built the dbt models its model reads (run_results.json), or any dbt Cloud job succeeds."}</p>`
                : html`<p class="muted small">Runs only when started by hand or through the API.</p>`}`
        : html`<p class="error small">${preview.error}</p>`)}
    </div>
  </fieldset>`;
}

/** What a destination's records must carry, from `POST /destinations/{name}/shape`. */
function ShapeHint({ shape }) {
  if (!shape) return null;
  if (!shape.ok) return html`<p class="error small" role="alert">${shape.error}</p>`;
  if (shape.action === null) {
    return html`<p class="muted small shape-hint">This destination receives each change with its operation and the fields as mapped.</p>`;
  }
  const list = (names) => names.map((n, i) => html`${i > 0 ? ", " : ""}<code>${n}</code>`);
  const idAliases = shape.aliases.filter((a) => shape.identity.includes(a.field));
  const topLevel = shape.top_level.filter((f) => !shape.filled.includes(f));
  const formats = shape.formats || [];
  const hashed = formats.filter((f) => f.format.startsWith("sha256"));
  const written = formats.filter((f) => !f.format.startsWith("sha256"));
  return html`<ul class="muted small shape-hint" aria-label="What the destination expects">
    ${shape.identity.length > 0 && html`<li>Each record needs ${shape.identity.length > 1 ? "one of " : ""}${list(shape.identity)}${idAliases.length > 0 ? html` (taken from a ${list(idAliases.map((a) => a.column))} column when not mapped)` : ""}.</li>`}
    ${shape.required.length > 0 && html`<li>Must be filled: ${list(shape.required)}.</li>`}
    ${topLevel.length > 0 && html`<li>Top-level fields: ${list(topLevel)}.</li>`}
    ${shape.filled.length > 0 && html`<li>sluice fills ${list(shape.filled)} itself.</li>`}
    ${shape.container && html`<li>Any other field goes under <code>${shape.container}</code>.</li>`}
    ${hashed.length > 0 && html`<li>Sent SHA-256 hashed, never raw: ${list(hashed.map((f) => f.field))}.</li>`}
    ${written.length > 0 && html`<li>Written as: ${written.map((f, i) => html`${i > 0 ? ", " : ""}<code>${f.field}</code> ${f.format.replace("_", " ")}`)}.</li>`}
    ${shape.events && html`<li>Each record is an event, sent once.</li>`}
  </ul>`;
}

/** The record selections a mapping form offers, and the operations each sends. */
const SELECTIONS = [
  ["all", ["added", "updated", "deleted"]],
  ["upserts", ["added", "updated"]],
  ["added", ["added"]],
  ["updated", ["updated"]],
  ["deleted", ["deleted"]],
  ["default", null],
];
const sameOps = (a, b) => a.length === b.length && a.every((op) => b.includes(op));

/** A new mapping, or an API-made one edited: model, destination, action, records, fields,
 * options and schedule. */
function NewMapping({ id: editing }) {
  const [models, setModels] = useState(null);
  const [destinations, setDestinations] = useState(null);
  // The definition being edited: what the form does not show is kept as it was.
  const [original, setOriginal] = useState(null);
  const [name, setName] = useState(editing || "");
  const [model, setModel] = useState("");
  const [destination, setDestination] = useState("");
  const [selection, setSelection] = useState("all");
  const [columns, setColumns] = useState([]);
  const [fields, setFields] = useState({});
  const [constants, setConstants] = useState([]);
  const [schedule, setSchedule] = useState("manual");
  const [catalog, setCatalog] = useState(null);
  const [action, setAction] = useState("");
  const [options, setOptions] = useState({});
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);

  useEffect(() => {
    const loads = [all("/models"), all("/destinations"), connectorCatalog(),
      editing ? api("GET", `/mappings/${encodeURIComponent(editing)}`) : null];
    Promise.all(loads)
      .then(([m, d, c, mapping]) => {
        if (mapping) {
          const o = mapping.definition;
          setOriginal(o);
          setModel(o.model);
          setDestination(o.destination);
          setSelection(SELECTIONS.find(([, ops]) => o.send && sameOps(ops, o.send))?.[0] ?? (o.send ? "all" : "default"));
          setConstants(Object.entries(o.constants ?? {}).map(([field, value]) => ({ field, value })));
          setSchedule(o.schedule ?? "manual");
        } else {
          if (m[0]) setModel(m[0].name);
          if (d[0]) setDestination(d[0].name);
        }
        setModels(m);
        setDestinations(d);
        setCatalog(c);
      })
      .catch((e) => setError(e.message));
  }, [editing]);
  // The model's columns come from its own preview (its query, run now); an edited mapping's
  // fields are put back beside their columns.
  // A preview answering after another model was picked is dropped, and what was typed beside
  // a column before its preview answered stays.
  useEffect(() => {
    if (!model) return;
    let current = true;
    api("POST", `/models/${encodeURIComponent(model)}/preview`, { limit: 1 })
      .then((p) => {
        if (!current) return;
        setColumns(p.columns);
        const next = Object.fromEntries(p.columns.map((c) => [c.name, ""]));
        if (original && original.model === model) {
          for (const [to, from] of Object.entries(original.fields ?? {})) {
            const column = typeof from === "string" ? from : from.column;
            if (next[column]) {
              setError(`Column ${column} goes to several fields (${next[column]}, ${to}), which this form cannot show: edit this mapping through the API.`);
            }
            next[column] = to;
          }
        }
        setFields((typed) => {
          const merged = { ...next };
          for (const column of Object.keys(merged)) {
            if (typed?.[column]) merged[column] = typed[column];
          }
          return merged;
        });
      })
      .catch((e) => current && setError(e.message));
    return () => {
      current = false;
    };
  }, [model, original]);

  // The destination type's actions and mapping options, from the server's connector catalog.
  const destinationType = destinations?.find((d) => d.name === destination)?.definition.type;
  const entry = catalog?.destinations.find((c) => c.type === destinationType);
  useEffect(() => {
    if (original && original.destination === destination) {
      setAction(original.action ?? entry?.actions?.find((a) => a.default)?.name ?? "");
      setOptions(original.options ?? {});
    } else {
      setAction(entry?.actions?.find((a) => a.default)?.name ?? "");
      setOptions({});
    }
  }, [destination, entry, original]);

  const send = SELECTIONS.find(([key]) => key === selection)?.[1];

  // What records of this action look like at the destination (checked by the destination
  // itself): suggestions for the field column, and what each record must carry.
  const shape = useAsk(() => {
    if (!destination) return null;
    const body = { options: pruned(options) ?? {} };
    if (action) body.action = action;
    return api("POST", `/destinations/${encodeURIComponent(destination)}/shape`, body);
  }, JSON.stringify([destination, action, pruned(options) ?? {}]), 300);
  const suggestions = shape?.ok
    ? [...new Set([...shape.required, ...shape.identity, ...shape.top_level])].filter((f) => !shape.filled.includes(f))
    : [];

  const submit = async (event) => {
    event.preventDefault();
    setBusy(true);
    const { model: _m, destination: _d, action: _a, options: _o, send: _s, fields: oldFields, constants: _c, schedule: _t, ...kept } = original ?? {};
    const definition = { ...kept, model, destination };
    if (send) definition.send = send;
    if (action) definition.action = action;
    const chosenOptions = pruned(options);
    if (chosenOptions) definition.options = chosenOptions;
    const mapped = Object.entries(fields).filter(([, to]) => to.trim());
    // A field written with a value format (`{column, as}`) keeps it.
    const spec = (column, to) => {
      const before = oldFields?.[to];
      return before && typeof before === "object" && before.column === column ? before : column;
    };
    if (mapped.length > 0) definition.fields = Object.fromEntries(mapped.map(([column, to]) => [to.trim(), spec(column, to.trim())]));
    const fixed = constants.filter((c) => c.field.trim());
    if (fixed.length > 0) definition.constants = Object.fromEntries(fixed.map((c) => [c.field.trim(), c.value]));
    if (schedule !== "manual" || original?.schedule === "manual") definition.schedule = schedule;
    try {
      if (editing) await api("PUT", `/mappings/${encodeURIComponent(editing)}`, { definition });
      else await api("POST", "/mappings", { name: name.trim(), definition });
      window.location.hash = `#/mapping/${encodeURIComponent(editing || name.trim())}`;
    } catch (e) {
      setError(e.message);
    } finally {
      setBusy(false);
    }
  };

  if (!models || !destinations) return error ? html`<p class="error" role="alert">${error}</p>` : html`<p class="muted">Loading…</p>`;
  if (models.length === 0 || destinations.length === 0) {
    return html`<h1>New mapping</h1><div class="panel empty"><p><strong>A mapping needs a model and a destination.</strong></p>
      <p class="muted">${models.length === 0 ? html`<a href="#/new-model">Write a model</a>` : html`<a href="#/new-destination">Add a destination</a>`} first (or define it in <code>sluice.yaml</code>).</p></div>`;
  }
  return html`
    <p><a href=${editing ? `#/mapping/${encodeURIComponent(editing)}` : "#/mappings"}>← ${editing || "Mappings"}</a></p>
    <h1>${editing ? `Edit ${editing}` : "New mapping"}</h1>
    <form class="panel form" onSubmit=${submit}>
      <div class="form-grid">
        <label for="mapping-name">Name</label>
        <input id="mapping-name" required pattern="[A-Za-z0-9_\-]+" value=${name} disabled=${Boolean(editing)} onInput=${(e) => setName(e.currentTarget.value)} />
        <label for="mapping-model">Model</label>
        <select id="mapping-model" value=${model} onChange=${(e) => setModel(e.currentTarget.value)}>
          ${models.map((m) => html`<option value=${m.name}>${m.name}</option>`)}</select>
        <label for="mapping-destination">Destination</label>
        <select id="mapping-destination" value=${destination} onChange=${(e) => setDestination(e.currentTarget.value)}>
          ${destinations.map((d) => html`<option value=${d.name}>${d.name} (${d.definition.type})</option>`)}</select>
        ${entry?.actions?.length > 0 && html`
          <label for="mapping-action">Action</label>
          <select id="mapping-action" required value=${action} onChange=${(e) => setAction(e.currentTarget.value)}>
            ${!entry.actions.some((a) => a.default) && html`<option value="">choose…</option>`}
            ${entry.actions.map((a) => html`<option value=${a.name}>${a.name} — ${a.summary}</option>`)}</select>`}
        <label for="mapping-send">Records</label>
        <select id="mapping-send" value=${selection} onChange=${(e) => setSelection(e.currentTarget.value)}>
          <option value="all">added, updated and deleted</option>
          <option value="upserts">added or updated</option>
          <option value="added">added</option>
          <option value="updated">updated</option>
          <option value="deleted">deleted</option>
          <option value="default">the destination's default</option>
        </select>
      </div>
      ${entry?.mapping_options && html`<fieldset>
        <legend>${entry.title} options</legend>
        <${OptionFields} key=${destination} schema=${entry.mapping_options} path=${["mapping"]} value=${options} onChange=${setOptions} />
      </fieldset>`}
      <fieldset>
        <legend>Fields</legend>
        <p class="muted small">Give a destination field to each model column to send; dots nest (<code>traits.plan</code>). Leave every field empty to send all columns under their own names.</p>
        <${ShapeHint} shape=${shape} />
        <datalist id="destination-fields">${suggestions.map((f) => html`<option value=${f} />`)}</datalist>
        <table class="pairs fields editor">
          <thead><tr><th scope="col">Model column</th><th scope="col">Destination field</th></tr></thead>
          <tbody>
            ${columns.map((c) => html`<tr key=${c.name}>
              <td><label for=${`field-${c.name}`}>${c.name}</label> <span class="muted small">${c.type}</span></td>
              <td><input id=${`field-${c.name}`} list="destination-fields" value=${fields[c.name] ?? ""} placeholder=${c.name}
                onInput=${(e) => setFields({ ...fields, [c.name]: e.currentTarget.value })} /></td></tr>`)}
            ${constants.map((c, i) => html`<tr key=${`constant-${i}`}>
              <td><label for=${`constant-value-${i}`}>constant</label>
                <input id=${`constant-value-${i}`} value=${typeof c.value === "string" ? c.value : JSON.stringify(c.value)} aria-label=${`constant ${i + 1} value`}
                  onInput=${(e) => setConstants(constants.map((x, j) => (j === i ? { ...x, value: e.currentTarget.value } : x)))} /></td>
              <td><input value=${c.field} aria-label=${`constant ${i + 1} field`} placeholder="context.source"
                onInput=${(e) => setConstants(constants.map((x, j) => (j === i ? { ...x, field: e.currentTarget.value } : x)))} /></td></tr>`)}
          </tbody>
        </table>
        <button type="button" class="secondary" onClick=${() => setConstants([...constants, { field: "", value: "" }])}>Add a constant</button>
      </fieldset>
      <${SchedulePicker} value=${original?.schedule} onChange=${setSchedule} />
      ${error && html`<p class="error" role="alert">${error}</p>`}
      <button type="submit" disabled=${busy}>${editing ? "Save" : "Create mapping"}</button>
    </form>
  `;
}

/** A SQL editor: a plain textarea over its own highlighted copy, so typing, selection,
 * undo and screen readers work as in any text field. */
function SqlEditor({ id, value, onInput, onRun }) {
  const [back, setBack] = useState(null);
  const sync = (e) => {
    if (back) {
      back.scrollTop = e.currentTarget.scrollTop;
      back.scrollLeft = e.currentTarget.scrollLeft;
    }
  };
  return html`<div class="sql-editor">
    <pre class="sql-back" aria-hidden="true" ref=${setBack}>${highlightSql(value)}${"\n"}</pre>
    <textarea id=${id} class="sql-front" rows="8" spellcheck="false" value=${value}
      onInput=${(e) => { onInput(e.currentTarget.value); sync(e); }} onScroll=${sync}
      onKeyDown=${(e) => { if (onRun && e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); onRun(); } }}></textarea>
  </div>`;
}

/** A new model, or an API-made one edited: a source, its SQL (previewed) or a model of the
 * project's dbt manifest, a primary key picked from its columns (or dbt's), a schedule. Options
 * the form does not show are kept as they were. */
function NewModel({ id: editing }) {
  const [sources, setSources] = useState(null);
  const [original, setOriginal] = useState(null);
  const [name, setName] = useState(editing || "");
  const [source, setSource] = useState("");
  const [sql, setSql] = useState("SELECT * FROM ");
  // The dbt manifest's models (none when the project has no manifest); "sql" or "dbt".
  const [dbt, setDbt] = useState({ manifest: null, models: [] });
  const [reads, setReads] = useState("sql");
  const [dbtModel, setDbtModel] = useState("");
  const [preview, setPreview] = useState(null);
  const [keys, setKeys] = useState([]);
  const [schedule, setSchedule] = useState("manual");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);

  useEffect(() => {
    Promise.all([
      all("/sources"),
      editing ? api("GET", `/models/${encodeURIComponent(editing)}`) : null,
      api("GET", "/dbt/models").catch(() => ({ manifest: null, models: [] })),
    ])
      .then(([list, model, dbtModels]) => {
        setDbt(dbtModels);
        if (model) {
          const d = model.definition;
          setOriginal(d);
          setSource(d.source);
          setSql(d.sql ?? "");
          setKeys([].concat(d.primary_key ?? []));
          setSchedule(d.schedule ?? "manual");
          if (d.dbt_model) {
            setReads("dbt");
            setDbtModel(d.dbt_model);
            const picked = dbtModels.models.find((m) => m.reference === d.dbt_model);
            if (!d.primary_key && picked?.primary_key) setKeys(picked.primary_key);
            if (picked) runPreview(d.source, `SELECT * FROM ${picked.relation}`);
          } else {
            // Its columns, for the key picker, come from its own query.
            runPreview(d.source, d.sql ?? "");
          }
        } else if (list[0]) {
          setSource(list[0].name);
        }
        setSources(list);
      })
      .catch((e) => setError(e.message));
  }, [editing]);

  const runPreview = async (from = source, text = sql) => {
    setBusy(true);
    try {
      const result = await api("POST", `/sources/${encodeURIComponent(from)}/preview`, { sql: text, limit: 10 });
      setPreview(result);
      setKeys((current) => current.filter((k) => result.columns.some((c) => c.name === k)));
      setError(null);
    } catch (e) {
      setPreview(null);
      setError(e.message);
    } finally {
      setBusy(false);
    }
  };

  const picked = dbt.models.find((m) => m.reference === dbtModel);
  const pickDbtModel = (reference) => {
    setDbtModel(reference);
    const model = dbt.models.find((m) => m.reference === reference);
    setKeys(model?.primary_key ?? []);
    setPreview(null);
    if (model) runPreview(source, `SELECT * FROM ${model.relation}`);
  };
  const sameKey = (a, b) => a && b && a.length === b.length && a.every((k) => b.includes(k));

  const submit = async (event) => {
    event.preventDefault();
    if (reads === "dbt" && !picked) {
      setError("Pick the dbt model this model reads.");
      return;
    }
    if (keys.length === 0) {
      setError(reads === "dbt"
        ? "dbt names no key for this model: preview it, then tick the column (or columns) that identify a row."
        : "Pick the column (or columns) that identify a row: preview the query, then tick its primary key.");
      return;
    }
    setBusy(true);
    const { schedule: _, sql: _sql, dbt_model: _dbt, primary_key: _key, ...kept } = original ?? {};
    const key = keys.length === 1 ? keys[0] : keys;
    const definition = reads === "dbt"
      // The key dbt gives is left to dbt, so a change there is followed.
      ? { ...kept, source, dbt_model: dbtModel, ...(sameKey(keys, picked.primary_key) ? {} : { primary_key: key }) }
      : { ...kept, source, sql, primary_key: key };
    if (schedule !== "manual" || original?.schedule === "manual") definition.schedule = schedule;
    try {
      if (editing) await api("PUT", `/models/${encodeURIComponent(editing)}`, { definition });
      else await api("POST", "/models", { name: name.trim(), definition });
      window.location.hash = `#/model/${encodeURIComponent(editing || name.trim())}`;
    } catch (e) {
      setError(e.message);
    } finally {
      setBusy(false);
    }
  };

  if (!sources) return error ? html`<p class="error" role="alert">${error}</p>` : html`<p class="muted">Loading…</p>`;
  if (sources.length === 0) {
    return html`<h1>New model</h1><div class="panel empty"><p><strong>A model needs a source.</strong></p>
      <p class="muted"><a href="#/new-source">Add a source</a> first (or define it in <code>sluice.yaml</code>).</p></div>`;
  }
  return html`
    <p><a href=${editing ? `#/model/${encodeURIComponent(editing)}` : "#/models"}>← ${editing || "Models"}</a></p>
    <h1>${editing ? `Edit ${editing}` : "New model"}</h1>
    <form class="panel form" onSubmit=${submit}>
      <div class="form-grid">
        <label for="model-name">Name</label>
        <input id="model-name" required pattern="[A-Za-z0-9_\-]+" value=${name} disabled=${Boolean(editing)} onInput=${(e) => setName(e.currentTarget.value)} />
        <label for="model-source">Source</label>
        <select id="model-source" value=${source} onChange=${(e) => setSource(e.currentTarget.value)}>
          ${sources.map((s) => html`<option value=${s.name}>${s.name} (${s.definition.type})</option>`)}</select>
      </div>
      ${(dbt.models.length > 0 || reads === "dbt") && html`<div class="controls" role="radiogroup" aria-label="Reads">
        <label class="day"><input type="radio" name="model-reads" checked=${reads === "sql"}
          onChange=${() => { setReads("sql"); setPreview(null); }} />a SQL query</label>
        <label class="day"><input type="radio" name="model-reads" checked=${reads === "dbt"}
          onChange=${() => { setReads("dbt"); setPreview(null); if (dbtModel) pickDbtModel(dbtModel); }} />a dbt model</label>
        ${dbt.manifest && html`<span class="muted small">dbt project ${dbt.manifest.project_name ?? ""}, manifest of ${localTime(dbt.manifest.generated_at)}</span>`}
      </div>`}
      ${reads === "dbt" ? html`
        <label for="model-dbt">dbt model</label>
        <select id="model-dbt" value=${dbtModel} onChange=${(e) => pickDbtModel(e.currentTarget.value)}>
          <option value="">Pick a dbt model…</option>
          ${dbt.models.map((m) => html`<option value=${m.reference}>${m.reference}${m.description ? ` — ${m.description}` : ""}</option>`)}
        </select>
        ${picked && html`<div class="panel dbt-model" aria-label="The dbt model">
          <p><code>${picked.relation}</code>${picked.description && html` · ${picked.description}`}</p>
          <p class="muted small">Key: ${picked.primary_key ? html`<code>${picked.primary_key.join(", ")}</code> (${picked.key_note.replaceAll("`", "")})` : picked.key_note.replaceAll("`", "")}</p>
          ${picked.columns.length > 0 && html`<table aria-label="Documented columns"><thead><tr><th>Column</th><th>Type</th><th>Description</th></tr></thead>
            <tbody>${picked.columns.map((c) => html`<tr><td>${c.name}</td><td>${c.data_type ?? ""}</td><td>${c.description}</td></tr>`)}</tbody></table>`}
        </div>`}` : html`
      <label for="model-sql">SQL</label>
      <${SqlEditor} id="model-sql" value=${sql} onInput=${setSql} onRun=${() => runPreview()} />
      <div class="controls">
        <button type="button" class="secondary" disabled=${busy || !sql.trim()} onClick=${() => runPreview()}>Preview</button>
        <span class="muted small">Ctrl+Enter previews: the first 10 rows and their column types.</span>
      </div>`}
      ${preview && html`
        <fieldset>
          <legend>Primary key</legend>
          <p class="muted small">The column, or columns, whose values identify a row.</p>
          <div class="controls" role="group" aria-label="Primary key columns">
            ${preview.columns.map((c) => html`<label class="day"><input type="checkbox" checked=${keys.includes(c.name)}
              aria-label=${`key ${c.name}`}
              onChange=${(e) => setKeys(e.currentTarget.checked ? [...keys, c.name] : keys.filter((k) => k !== c.name))} />
              ${c.name}</label>`)}
          </div>
        </fieldset>
        <${PreviewTable} preview=${preview} />`}
      <${SchedulePicker} value=${original?.schedule} onChange=${setSchedule} />
      ${error && html`<p class="error" role="alert">${error}</p>`}
      <button type="submit" disabled=${busy}>${editing ? "Save" : "Create model"}</button>
    </form>
  `;
}

// ---- The shell -----------------------------------------------------------------------------

const screens = [
  { path: "overview", title: "Overview", view: Overview },
  { path: "sources", title: "Sources", view: Sources },
  { path: "models", title: "Models", view: Models },
  { path: "model", title: "Model", view: ModelPage, hidden: true, parent: "models" },
  { path: "new-model", title: "New model", view: NewModel, hidden: true, parent: "models" },
  { path: "edit-model", title: "Edit model", view: NewModel, hidden: true, parent: "models" },
  { path: "source", title: "Source", view: (p) => html`<${ConnectionPage} kind="sources" ...${p} />`, hidden: true, parent: "sources" },
  { path: "new-source", title: "Add source", view: (p) => html`<${ConnectionForm} kind="sources" ...${p} />`, hidden: true, parent: "sources" },
  { path: "edit-source", title: "Edit source", view: (p) => html`<${ConnectionForm} kind="sources" ...${p} />`, hidden: true, parent: "sources" },
  { path: "destinations", title: "Destinations", view: Destinations },
  { path: "destination", title: "Destination", view: (p) => html`<${ConnectionPage} kind="destinations" ...${p} />`, hidden: true, parent: "destinations" },
  { path: "new-destination", title: "Add destination", view: (p) => html`<${ConnectionForm} kind="destinations" ...${p} />`, hidden: true, parent: "destinations" },
  { path: "edit-destination", title: "Edit destination", view: (p) => html`<${ConnectionForm} kind="destinations" ...${p} />`, hidden: true, parent: "destinations" },
  { path: "mappings", title: "Mappings", view: Mappings },
  { path: "mapping", title: "Mapping", view: MappingPage, hidden: true, parent: "mappings" },
  { path: "new-mapping", title: "New mapping", view: NewMapping, hidden: true, parent: "mappings" },
  { path: "edit-mapping", title: "Edit mapping", view: NewMapping, hidden: true, parent: "mappings" },
  { path: "runs", title: "Runs", view: Runs },
  { path: "history", title: "History", view: History },
  { path: "run", title: "Run", view: RunPage, hidden: true, parent: "runs" },
];

/** The screen, its path argument and query of `#/screen/argument?query`. */
function currentRoute() {
  const [pathPart, queryPart] = window.location.hash.replace(/^#\/?/, "").split("?");
  const [path, ...rest] = (pathPart || "overview").split("/");
  return { path, argument: rest.join("/"), query: new URLSearchParams(queryPart ?? "") };
}

function App() {
  const [route, setRoute] = useState(currentRoute());
  useEffect(() => {
    const changed = () => setRoute(currentRoute());
    window.addEventListener("hashchange", changed);
    return () => window.removeEventListener("hashchange", changed);
  }, []);
  const screen = screens.find((s) => s.path === route.path) ?? screens[0];
  const current = screen.parent ?? screen.path;
  useEffect(() => {
    document.title = `${screen.title} · sluice`;
  }, [screen]);
  return html`
    <header class="top">
      <a class="brand" href="#/overview">sluice</a>
      <nav aria-label="Screens">
        ${screens.filter((s) => !s.hidden).map(
          (s) => html`<a href=${`#/${s.path}`} aria-current=${s.path === current ? "page" : undefined}>${s.title}</a>`,
        )}
      </nav>
      <form method="post" action="/logout">
        <input type="hidden" name="csrf" value=${csrfToken()} />
        <button type="submit">Sign out</button>
      </form>
    </header>
    <main><${screen.view} key=${`${route.path}/${route.argument}?${route.query}`}
      id=${decodeURIComponent(route.argument)} query=${route.query} mapping=${route.query.get("mapping") ?? undefined} /></main>
  `;
}

render(html`<${App} />`, document.getElementById("app"));
