// stop-strings.ts: stop strings over streamed text, shared by the server's completions and evaluation's
// generate_until: text is released only once no stop string can still start inside it, and generation ends at
// the first stop string (which is not part of the answer).
export class StopMatcher {
    private pending = "";
    constructor(private readonly stops: readonly string[]) {}

    /** the text now safe to send, and whether a stop string was reached */
    push(piece: string): {text: string; stopped: boolean} {
        this.pending += piece;
        if (this.stops.length === 0) {
            const text = this.pending;
            this.pending = "";
            return {text, stopped: false};
        }
        let first = -1;
        for (const s of this.stops) {
            const at = this.pending.indexOf(s);
            if (at >= 0 && (first < 0 || at < first)) first = at;
        }
        if (first >= 0) {
            const text = this.pending.slice(0, first);
            this.pending = "";
            return {text, stopped: true};
        }
        // hold back the longest tail that is the start of some stop string
        let hold = 0;
        for (const s of this.stops)
            for (let k = Math.min(s.length - 1, this.pending.length); k > hold; k--)
                if (this.pending.endsWith(s.slice(0, k))) {
                    hold = k;
                    break;
                }
        const text = this.pending.slice(0, this.pending.length - hold);
        this.pending = this.pending.slice(this.pending.length - hold);
        return {text, stopped: false};
    }

    /** the held-back text at the end of generation, with the decoder's last bytes */
    flush(last: string): string {
        const r = this.push(last);
        const text = r.stopped ? r.text : r.text + this.pending;
        this.pending = "";
        return text;
    }
}
