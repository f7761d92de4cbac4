// The service's HTTP API as the console uses it: JSON in, JSON out, the signed-in key on every call.
// A failed call throws ApiError carrying the service's own error type and message.

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

export class Api {
  constructor(key) {
    this.key = key || "";
  }

  headers(extra = {}) {
    return this.key ? { Authorization: `Bearer ${this.key}`, ...extra } : extra;
  }

  async request(method, path, body) {
    const init = { method, headers: this.headers() };
    if (body !== undefined) {
      init.headers = this.headers({ "Content-Type": "application/json" });
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, "network_error", `the service could not be reached (${err.message})`);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      // both error shapes (this API's and OpenAI's on /v1) carry error.message
      const err = data && data.error;
      const type = (err && (err.type || err.code)) || `http_${response.status}`;
      const message = (err && err.message) || text.trim() || response.statusText || "request failed";
      throw new ApiError(response.status, type, message);
    }
    return data;
  }

  get(path, params) {
    const query = params ? new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v != null)) : null;
    return this.request("GET", query && [...query].length ? `${path}?${query}` : path);
  }

  post(path, body) {
    return this.request("POST", path, body);
  }

  async text(path) {
    const response = await fetch(path, { headers: this.headers() });
    if (!response.ok) throw new ApiError(response.status, `http_${response.status}`, await response.text());
    return response.text();
  }

  // /readyz answers 503 with a useful body while not ready, so its body is read either way
  async readiness() {
    const response = await fetch("/readyz");
    return { ok: response.ok, ...(await response.json()) };
  }
}
