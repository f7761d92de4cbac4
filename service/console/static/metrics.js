// Prometheus text exposition, parsed just enough for the console: samples by metric name, and a
// histogram's count, mean and quantiles estimated from its cumulative buckets.

export function parsePrometheus(text) {
  const samples = new Map();
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
    if (!match) continue;
    const [, name, labelText, value] = match;
    const labels = {};
    if (labelText) {
      for (const m of labelText.slice(1, -1).matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[m[1]] = m[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
    }
    if (!samples.has(name)) samples.set(name, []);
    samples.get(name).push({ labels, value: Number(value) });
  }
  return samples;
}

export function value(samples, name) {
  const rows = samples.get(name);
  return rows && rows.length ? rows[0].value : null;
}

// quantile q of a histogram by linear interpolation inside the bucket it falls in, as PromQL does
export function histogram(samples, name) {
  const count = value(samples, `${name}_count`) || 0;
  const sum = value(samples, `${name}_sum`) || 0;
  const buckets = (samples.get(`${name}_bucket`) || [])
    .map((s) => ({ le: s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), n: s.value }))
    .sort((a, b) => a.le - b.le);
  const quantile = (q) => {
    if (!count) return null;
    const rank = q * count;
    let lower = 0;
    let below = 0;
    for (const b of buckets) {
      if (b.n >= rank) {
        if (b.le === Infinity) return lower;
        const inside = b.n - below;
        return inside ? lower + (b.le - lower) * ((rank - below) / inside) : b.le;
      }
      lower = b.le;
      below = b.n;
    }
    return lower;
  };
  return { count, mean: count ? sum / count : null, p50: quantile(0.5), p95: quantile(0.95) };
}
