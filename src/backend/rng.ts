// rng.ts: a small seedable random generator (xoshiro128**, seeded through splitmix32) whose whole state is
// four 32-bit words, so training can save it in a checkpoint and resume bit-identically.

export class Rng {
    private s: Uint32Array;

    constructor(seed: number | Uint32Array = 42) {
        if (seed instanceof Uint32Array) {
            this.s = Uint32Array.from(seed);
            return;
        }
        this.s = new Uint32Array(4);
        let x = (Math.floor(seed) >>> 0) ^ 0x9e3779b9;
        for (let i = 0; i < 4; i++) {
            // splitmix32
            x = (x + 0x9e3779b9) >>> 0;
            let z = x;
            z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
            z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
            this.s[i] = (z ^ (z >>> 16)) >>> 0;
        }
        if (this.s.every((w) => w === 0)) this.s[0] = 1;
    }

    /** a uniform 32-bit unsigned integer */
    nextU32(): number {
        const s = this.s;
        const result = Math.imul(rotl(Math.imul(s[1], 5) >>> 0, 7), 9) >>> 0;
        const t = (s[1] << 9) >>> 0;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = rotl(s[3], 11);
        return result;
    }

    /** uniform in [0, 1) with 32 bits of randomness */
    next(): number {
        return this.nextU32() / 4294967296;
    }

    /** uniform integer in [0, n) */
    int(n: number): number {
        return Math.floor(this.next() * n);
    }

    /** standard normal (Box-Muller) */
    normal(): number {
        let u = 0;
        while (u === 0) u = this.next();
        return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * this.next());
    }

    /** Fisher-Yates shuffle in place */
    shuffle<T>(items: T[]): T[] {
        for (let i = items.length - 1; i > 0; i--) {
            const j = this.int(i + 1);
            [items[i], items[j]] = [items[j], items[i]];
        }
        return items;
    }

    getState(): number[] {
        return Array.from(this.s);
    }

    setState(state: number[]): void {
        this.s.set(state);
    }

    static fromState(state: number[]): Rng {
        return new Rng(Uint32Array.from(state));
    }
}

function rotl(x: number, k: number): number {
    return ((x << k) | (x >>> (32 - k))) >>> 0;
}
