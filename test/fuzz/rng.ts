// rng.ts: the fuzzer's seeded choices. Every case draws from its own generator, seeded from (run seed, format,
// case index), so one case can be replayed alone (`npm run fuzz -- --format F --seed S --case N`).
import {Prng} from "../helpers/prng.js";

/** FNV-1a over the text, then a murmur3 finalizer: a well-mixed 32-bit seed for one case */
export function caseSeed(seed: number, format: string, index: number): number {
    let h = 0x811c9dc5;
    for (const ch of `${seed >>> 0}:${format}:${index}`) h = Math.imul(h ^ ch.charCodeAt(0), 0x01000193) >>> 0;
    h ^= h >>> 16;
    h = Math.imul(h, 0x85ebca6b) >>> 0;
    h ^= h >>> 13;
    h = Math.imul(h, 0xc2b2ae35) >>> 0;
    return (h ^ (h >>> 16)) >>> 0;
}

export class FuzzRng {
    private readonly prng: Prng;

    constructor(seed: number) {
        this.prng = new Prng(seed);
    }

    /** an integer in [0, n) */
    int(n: number): number {
        return n <= 0 ? 0 : this.prng.int(n);
    }

    /** an integer in [lo, hi] */
    range(lo: number, hi: number): number {
        return lo + this.int(hi - lo + 1);
    }

    chance(p: number): boolean {
        return this.prng.uniform() < p;
    }

    pick<T>(items: readonly T[]): T {
        return items[this.int(items.length)];
    }

    /** picks by weight: [[weight, value], ...] */
    weighted<T>(items: readonly (readonly [number, T])[]): T {
        const total = items.reduce((s, [w]) => s + w, 0);
        let x = this.prng.uniform() * total;
        for (const [w, v] of items) {
            x -= w;
            if (x < 0) return v;
        }
        return items[items.length - 1][1];
    }

    bytes(n: number): Buffer {
        const b = Buffer.alloc(n);
        for (let i = 0; i < n; i++) b[i] = this.prng.u32() & 0xff;
        return b;
    }

    /** a small count that is usually 1 (geometric with p = 0.6), at most max */
    count(max: number): number {
        let n = 1;
        while (n < max && this.prng.uniform() < 0.4) n++;
        return n;
    }
}
