// args.ts: the `--key value` / `--key=value` / `--flag` arguments of the fuzz and soak scripts.

export function parseArgs(argv: string[]): Map<string, string> {
    const out = new Map<string, string>();
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (!a.startsWith("--")) throw new Error(`unexpected argument "${a}"`);
        const [k, inline] = a.slice(2).split("=", 2);
        out.set(k, inline ?? (argv[i + 1] !== undefined && !argv[i + 1].startsWith("--") ? argv[++i] : "true"));
    }
    return out;
}

export function intArg(args: Map<string, string>, key: string, fallback: number): number {
    const v = args.get(key);
    if (v === undefined) return fallback;
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`--${key} expects a non-negative integer, got "${v}"`);
    return n;
}
