// A step plot of edits over time, drawn as SVG by hand: edits made so far and edits still active.

const NS = "http://www.w3.org/2000/svg";
const H = 160;
const PAD = { left: 36, right: 8, top: 10, bottom: 22 };

function el(name, attrs, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// [[time ms, count], ...] of a running total over +1/-1 events
function steps(events) {
  events.sort((a, b) => a[0] - b[0]);
  let n = 0;
  return events.map(([t, d]) => [t, (n += d)]);
}

// drawn in the SVG's own pixel width, so text is never stretched; redraw when that width changes
export function drawEditsPlot(svg, edits, now = Date.now()) {
  const W = Math.max(svg.clientWidth, 240);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const made = steps(edits.map((e) => [Date.parse(e.created_at), 1]));
  const active = steps(
    edits.flatMap((e) => [[Date.parse(e.created_at), 1], ...(e.rolled_back_at ? [[Date.parse(e.rolled_back_at), -1]] : [])]),
  );
  if (!made.length) {
    svg.append(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "plot-empty" }, "no edits yet"));
    return "no edits yet";
  }
  const t0 = made[0][0];
  const t1 = Math.max(now, made[made.length - 1][0], active[active.length - 1][0]);
  const span = Math.max(t1 - t0, 1000);
  const top = Math.max(made[made.length - 1][1], 1);
  const x = (t) => PAD.left + ((t - t0) / span) * (W - PAD.left - PAD.right);
  const y = (n) => H - PAD.bottom - (n / top) * (H - PAD.top - PAD.bottom);
  const path = (series) => {
    let d = `M${x(t0)},${y(0)}`;
    for (const [t, n] of series) d += ` H${x(t).toFixed(1)} V${y(n).toFixed(1)}`;
    return `${d} H${x(t1).toFixed(1)}`;
  };
  svg.append(
    el("line", { x1: PAD.left, y1: y(0), x2: W - PAD.right, y2: y(0), class: "plot-axis" }),
    el("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: y(0), class: "plot-axis" }),
    el("text", { x: PAD.left - 4, y: y(top) + 4, "text-anchor": "end", class: "plot-label" }, String(top)),
    el("text", { x: PAD.left - 4, y: y(0) + 4, "text-anchor": "end", class: "plot-label" }, "0"),
    el("text", { x: PAD.left, y: H - 6, class: "plot-label" }, new Date(t0).toLocaleString()),
    el("text", { x: W - PAD.right, y: H - 6, "text-anchor": "end", class: "plot-label" }, new Date(t1).toLocaleString()),
    el("path", { d: path(made), class: "plot-made" }),
    el("path", { d: path(active), class: "plot-active" }),
    el("text", { x: PAD.left + 8, y: PAD.top + 10, class: "plot-legend plot-made-text" }, "made"),
    el("text", { x: PAD.left + 60, y: PAD.top + 10, class: "plot-legend plot-active-text" }, "active"),
  );
  const summary = `${made[made.length - 1][1]} edits made, ${active[active.length - 1][1]} active`;
  svg.append(el("title", {}, `Edits over time: ${summary}`));
  return summary;
}
