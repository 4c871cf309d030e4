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
  constructor(status, body) {
    super(body?.error?.message || `the server answered ${status}`);
    this.status = status;
    this.code = body?.error?.code;
  }
}

/** Calls the API with the session cookie; changes carry the CSRF token. */
async function api(method, path, body) {
  const headers = { Accept: "application/json" };
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
  const text = await response.text();
  const parsed = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError(response.status, parsed);
  return parsed;
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
          <p class="muted">A mapping sends a model's changed records to a destination. Define a source, a model, a destination and a mapping in <code>sluice.yaml</code> or through the API (<code>POST /api/v1/mappings</code>).</p>
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

// ---- The shell -----------------------------------------------------------------------------

const screens = [{ path: "overview", title: "Overview", view: Overview }];

function currentPath() {
  return window.location.hash.replace(/^#\/?/, "") || "overview";
}

function App() {
  const [path, setPath] = useState(currentPath());
  useEffect(() => {
    const changed = () => setPath(currentPath());
    window.addEventListener("hashchange", changed);
    return () => window.removeEventListener("hashchange", changed);
  }, []);
  const screen = screens.find((s) => s.path === path) ?? screens[0];
  useEffect(() => {
    document.title = `${screen.title} · sluice`;
  }, [screen]);
  return html`
    <header class="top">
      <a class="brand" href="#/overview">sluice</a>
      <nav aria-label="Screens">
        ${screens.map(
          (s) => html`<a href=${`#/${s.path}`} aria-current=${s === screen ? "page" : undefined}>${s.title}</a>`,
        )}
      </nav>
      <form method="post" action="/logout">
        <input type="hidden" name="csrf" value=${csrfToken()} />
        <button type="submit">Sign out</button>
      </form>
    </header>
    <main><${screen.view} /></main>
  `;
}

render(html`<${App} />`, document.getElementById("app"));
