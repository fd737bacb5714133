// api.ts: the page's calls to `qlora ui`'s HTTP API (same origin; a token in the page's URL, when the server needs
// one, is also kept in a cookie by the server, so every request and event stream carries it).
import type {ErrorReply} from "../api-types.js";

/** the token of the page's URL (a UI bound beyond this machine), passed on to each request */
const token = new URLSearchParams(location.search).get("token");

export function apiUrl(path: string): string {
    if (!token) return path;
    return `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
}

/** a JSON call; a reply with an error object throws its message (the CLI's words for a bad form value) */
export async function api<T>(path: string, body?: unknown): Promise<T> {
    const res = await fetch(apiUrl(path), {
        method: body === undefined ? "GET" : "POST",
        headers: body === undefined ? {} : {"content-type": "application/json"},
        body: body === undefined ? undefined : JSON.stringify(body)
    });
    const text = await res.text();
    let data: unknown;
    try {
        data = JSON.parse(text);
    } catch {
        throw new Error(`${res.status} ${res.statusText}: ${text.slice(0, 200)}`);
    }
    if (!res.ok) throw new Error((data as ErrorReply).error?.message ?? `${res.status} ${res.statusText}`);
    return data as T;
}

export function runPath(name: string, rest = ""): string {
    return `/api/runs/${encodeURIComponent(name)}${rest}`;
}
