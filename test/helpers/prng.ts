// prng.ts: the seeded generator of the op tests (mulberry32): uniform, normal and integer draws.

export class Prng {
    private s: number;

    constructor(seed: number) {
        this.s = seed >>> 0;
    }

    u32(): number {
        let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
        t = Math.imul(t ^ (t >>> 15), t | 1);
        t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
        return (t ^ (t >>> 14)) >>> 0;
    }

    /** uniform in (0, 1) */
    uniform(): number {
        return (this.u32() + 0.5) / 4294967296;
    }

    normal(): number {
        return Math.sqrt(-2 * Math.log(this.uniform())) * Math.cos(2 * Math.PI * this.uniform());
    }

    int(n: number): number {
        return Math.floor(this.uniform() * n);
    }
}

/** n values of N(mean, std^2) as float32 */
export function randn32(rng: Prng, n: number, std = 1, mean = 0): Float32Array {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = mean + std * rng.normal();
    return a;
}
