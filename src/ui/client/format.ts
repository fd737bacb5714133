// format.ts: sizes and durations as the page shows them (numbers: charts.ts's formatNumber, the report's).

export function formatBytes(b: number | null | undefined): string {
    if (b === null || b === undefined || !Number.isFinite(b)) return "–";
    if (b >= 2 ** 30) return `${(b / 2 ** 30).toFixed(2)} GiB`;
    return `${(b / 2 ** 20).toFixed(0)} MiB`;
}

export function formatDuration(s: number | null | undefined): string {
    if (s === null || s === undefined || !Number.isFinite(s) || s < 0) return "?";
    s = Math.round(s);
    const h = Math.floor(s / 3600),
        m = Math.floor((s % 3600) / 60),
        sec = s % 60;
    const mm = String(m).padStart(h ? 2 : 1, "0"),
        ss = String(sec).padStart(2, "0");
    return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}
