// server.ts: `qlora ui`, a local web app over node:http: the run form (from the train config's schema), the data
// preview and memory plan of its values, runs started, stopped and resumed as `qlora train` child processes with
// their records streamed to the page as server-sent events, the runs of the output root with their curves, and a
// chat with a run's adapter through `qlora serve`'s request handling. The page is static files (built from
// src/ui/client into dist/ui/client) and uPlot from the package, so it works offline.
//
// Access: bound to a loopback address, only requests whose Host is a loopback name are answered (a web page cannot
// reach the UI through DNS rebinding); bound elsewhere, every request must carry the random token printed at start
// (`?token=` in the URL, or `Authorization: Bearer`). Requests that change something must be JSON (which a
// cross-site form cannot send without the browser asking first), and bodies are capped.
import {randomBytes, timingSafeEqual} from "node:crypto";
import {promises as fs} from "node:fs";
import http from "node:http";
import {isIP} from "node:net";
import path from "node:path";
import {packageRoot} from "../backend/native.js";
import {isQloraError} from "../errors.js";
import {CHARTS_JS, uplotAssets} from "../train/report-charts.js";
import {readJsonBody, RequestError, sendError, sendJson} from "../serve/server.js";
import {RunChats} from "./chat.js";
import {checkForm, configReply, schemaReply} from "./form.js";
import {checkRunName, RunManager} from "./runs.js";
import {planReply, previewReply} from "./tools.js";

export interface UiServerOptions {
    /** the folder whose subfolders are runs; new runs are made in it */
    outputRoot: string;
    /** the argv that runs the qlora command line (node, its flags, the entry script) for `qlora train` children */
    qloraCommand: string[];
    /** the token every request must carry, or null (bound to a loopback address: Host names are checked instead) */
    token: string | null;
    /** the page's files (index.html, style.css, the compiled scripts); default: dist/ui/client of the package */
    assetsDir?: string;
    /** the working folder of the runs (relative dataset paths); default: this process's */
    cwd?: string;
    /** the largest request body, bytes (default 1 MiB) */
    maxBodyBytes?: number;
    /** one line per chat request and per failure the page did not cause */
    log?: (line: string) => void;
}

export interface UiServer {
    server: http.Server;
    runs: RunManager;
    /** stops the runs this UI started (each saves a checkpoint), then the server */
    close(): Promise<void>;
}

/** the folder `npm run build` writes the page into */
export const DEFAULT_ASSETS_DIR = path.join(packageRoot, "dist", "ui", "client");

/** loopback hosts: no token needed there */
export function isLoopbackHost(host: string): boolean {
    const h = host.replace(/^\[|\]$/g, "").toLowerCase();
    return h === "localhost" || h === "::1" || (isIP(h) === 4 && h.startsWith("127."));
}

/** the token of a UI bound to `host`: null on loopback, else 128 random bits */
export function tokenFor(host: string): string | null {
    return isLoopbackHost(host) ? null : randomBytes(16).toString("base64url");
}

const CONTENT_TYPES: Record<string, string> = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml"
};

/** every response: no sniffing, no framing, scripts and styles from this server only (nothing from a CDN) */
const SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy":
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
};

export function createUiServer(opts: UiServerOptions): UiServer {
    const outputRoot = path.resolve(opts.outputRoot);
    const assetsDir = opts.assetsDir ?? DEFAULT_ASSETS_DIR;
    const maxBodyBytes = opts.maxBodyBytes ?? 1 << 20;
    const runs = new RunManager({outputRoot, qloraCommand: opts.qloraCommand, cwd: opts.cwd ?? process.cwd()});
    const chats = new RunChats({maxBodyBytes, log: opts.log});
    const expected = opts.token === null ? null : Buffer.from(opts.token);

    const authorize = (req: http.IncomingMessage, res: http.ServerResponse, url: URL): void => {
        if (expected === null) {
            const host = (req.headers.host ?? "").replace(/:\d+$/, "");
            if (!isLoopbackHost(host))
                throw new RequestError(
                    403,
                    `this qlora ui answers requests to localhost only (the request was for ${JSON.stringify(host)})`,
                    null,
                    "forbidden_host"
                );
            return;
        }
        // the page's URL carries it once; a cookie (HttpOnly, this site only) then carries it for the page's own
        // requests (styles, scripts, event streams); API clients send it as a bearer token
        const cookie = `qlora_ui_${req.socket.localPort}`;
        const fromCookie = new RegExp(`(?:^|;\\s*)${cookie}=([^;]*)`).exec(req.headers.cookie ?? "")?.[1];
        const fromUrl = url.searchParams.get("token");
        const bearer = /^Bearer (.+)$/.exec(req.headers.authorization ?? "")?.[1];
        const given = Buffer.from(fromUrl ?? bearer ?? fromCookie ?? "");
        if (given.length !== expected.length || !timingSafeEqual(given, expected))
            throw new RequestError(
                401,
                "this qlora ui needs its token: open the URL it printed at start (…/?token=…)",
                "token",
                "invalid_token",
                "authentication_error"
            );
        if (fromUrl !== null && fromCookie !== fromUrl)
            res.setHeader("set-cookie", `${cookie}=${fromUrl}; HttpOnly; SameSite=Strict; Path=/`);
    };

    const body = async (req: http.IncomingMessage): Promise<Record<string, unknown>> => {
        if (!/^application\/json\b/i.test(req.headers["content-type"] ?? ""))
            throw new RequestError(415, "send the request body as application/json", null, "unsupported_media_type");
        return readJsonBody(req, maxBodyBytes, "qlora ui's limit");
    };

    const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
        for (const [k, v] of Object.entries(SECURITY_HEADERS)) res.setHeader(k, v);
        const url = new URL(req.url ?? "/", "http://localhost");
        authorize(req, res, url);
        const route = url.pathname;
        const method = req.method ?? "GET";
        const get = method === "GET" || method === "HEAD";

        if (get && (route === "/" || route === "/index.html")) return sendFile(res, path.join(assetsDir, "index.html"));
        if (get && route.startsWith("/assets/")) {
            const name = route.slice("/assets/".length);
            if (!/^[\w-]+(\.[\w-]+)*\.(js|css|png|svg)$/.test(name))
                throw new RequestError(404, `no asset ${name}`, null, "unknown_route");
            // uPlot and report.html's chart code come from the package, as the report inlines them
            if (name === "uPlot.iife.min.js") return sendText(res, ".js", uplotAssets().js);
            if (name === "uPlot.min.css") return sendText(res, ".css", uplotAssets().css);
            if (name === "report-charts.js") return sendText(res, ".js", CHARTS_JS);
            return sendFile(res, path.join(assetsDir, name));
        }
        if (get && route === "/api/schema") return sendJson(res, 200, await schemaReply(outputRoot));
        if (get && route === "/api/runs") return sendJson(res, 200, {runs: await runs.list()});
        if (method === "POST" && route === "/api/config")
            return sendJson(res, 200, configReply(await checkForm(await body(req), outputRoot)));
        if (method === "POST" && route === "/api/preview") {
            const checked = await checkForm(await body(req), outputRoot);
            return sendJson(res, 200, await previewReply(checked.config));
        }
        if (method === "POST" && route === "/api/plan") {
            const b = await body(req);
            const checked = await checkForm(b, outputRoot);
            return sendJson(res, 200, await planReply(checked.flags, b.gpu));
        }
        if (method === "POST" && route === "/api/runs") {
            const checked = await checkForm(await body(req), outputRoot);
            return sendJson(res, 201, await runs.start(checked.name, checked.flags));
        }
        const m = /^\/api\/runs\/([^/]+)(\/.*)?$/.exec(route);
        if (m) {
            let name: string;
            try {
                name = checkRunName(decodeURIComponent(m[1]));
            } catch (err) {
                if (err instanceof RequestError) throw err;
                throw new RequestError(400, "the run name in the URL is not valid percent-encoding", "name");
            }
            const rest = m[2] ?? "";
            if (get && rest === "") return sendJson(res, 200, await runs.summary(name));
            if (get && rest === "/metrics") return sendJson(res, 200, {records: await runs.metrics(name)});
            if (get && rest === "/events") return runs.follow(name, res);
            if (get && rest === "/report.html") {
                await runs.summary(name);
                // the run's report.html is one self-contained page with inline scripts: allowed for it alone, in a
                // sandbox (an origin of its own: it reaches neither this API nor its cookie) and with no network
                res.setHeader(
                    "content-security-policy",
                    "sandbox allow-scripts; default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"
                );
                return sendFile(res, path.join(outputRoot, name, "report.html"));
            }
            if (method === "POST" && rest === "/stop") {
                await body(req);
                return sendJson(res, 200, await runs.stop(name));
            }
            if (method === "POST" && rest === "/resume") {
                await body(req);
                return sendJson(res, 200, await runs.resume(name));
            }
            if (rest.startsWith("/v1/")) {
                if (method === "POST" && !/^application\/json\b/i.test(req.headers["content-type"] ?? ""))
                    throw new RequestError(415, "send the request body as application/json", null, "unsupported_media_type");
                const handler = await chats.handlerFor(await runs.summary(name), await runs.metrics(name));
                // the serve handler sees its own routes (/v1/chat/completions, ...)
                req.url = rest + url.search;
                return handler(req, res);
            }
        }
        throw new RequestError(404, `no route ${method} ${route}`, null, "unknown_route");
    };

    const server = http.createServer((req, res) => {
        handle(req, res).catch((err: unknown) => {
            if (!(err instanceof RequestError) && !isQloraError(err))
                opts.log?.(`${req.method} ${req.url?.split("?")[0]}: ${(err as Error).message}`);
            sendError(res, err);
        });
    });
    server.keepAliveTimeout = 65_000;
    server.headersTimeout = 66_000;
    return {
        server,
        runs,
        async close() {
            await runs.close();
            await new Promise<void>((resolve) => {
                server.close(() => resolve());
                server.closeAllConnections();
            });
        }
    };
}

async function sendFile(res: http.ServerResponse, file: string): Promise<void> {
    let data: Buffer;
    try {
        data = await fs.readFile(file);
    } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
        if (path.basename(file) === "index.html")
            throw new RequestError(
                500,
                `the page is not built: ${file} is missing (run npm run build in ${packageRoot})`,
                null,
                "not_built",
                "server_error"
            );
        throw new RequestError(404, `no asset ${path.basename(file)}`, null, "unknown_route");
    }
    sendText(res, path.extname(file), data);
}

function sendText(res: http.ServerResponse, ext: string, data: string | Buffer): void {
    res.writeHead(200, {
        "content-type": CONTENT_TYPES[ext] ?? "application/octet-stream",
        "content-length": Buffer.byteLength(data),
        "cache-control": "no-cache"
    });
    res.end(data);
}
