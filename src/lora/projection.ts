// projection.ts: a projection of a decoder block as the graph runs it (GraphLinear), written once over the Backend:
// the frozen base W (dense or 4-bit: a FrozenWeight of the backend), the bias (frozen, or trained with bias
// all / lora_only), and PEFT's LoRA branch with DoRA as its variant. The CPU and the GPU run this same code.
//
//   y = x W^T + b + s (drop(x) A^T) B^T          A [r, in], B [out, r], s = alpha / r (or alpha / sqrt(r))
//
// Backward (gradient rule: parameter grads +=, the input grad = or +=):
//   dB += s dy^T xa;  dxa = s dy B;  dA += dxa^T drop(x);  dx = dy W + (dxa A) * mask;  db += colsum(dy)
// forward hands xa = drop(x) A^T [M, r] to backward; drop(x) is regenerated from its counter-based mask.
//
// DoRA (PEFT's DoraLinearLayer): a magnitude m [out] rescales each output row, k = m / ||W + s B A||_row with the
// norm treated as a constant (detached, DoRA paper §4.3); with bt = drop(x) W^T and lt = s xa B^T:
//   y = x W^T + (k - 1) bt + k lt + b           (without dropout bt = x W^T, so y = k (bt + lt) + b)
//   dm += colsum(dy * (bt + lt)) / norm;  the LoRA backward runs on dy * k;  dx += ((k - 1) dy) W through the mask
// k and the norm depend only on the weights: computed once per optimizer step (afterUpdate drops them).
//
// Trainable tensors are fp32 on the backend (on the CPU the host arrays themselves, so the host optimizer updates
// them in place); the GEMMs read compute copies in the activation dtype (bf16 on the GPU), refreshed by afterUpdate.
import type {Backend, FrozenWeight, GraphLinear, LoraTerm, TensorTypes} from "../backend/backend.js";
import type {LinearLayer} from "../backend/linear.js";
import {LoraLinear, type TrainableTensor} from "./layer.js";

/** a trainable tensor on the backend: the fp32 master, its gradient, and the host tensor it mirrors */
export interface BackendTensor<F> {
    host: TrainableTensor;
    param: F;
    grad: F;
}

/** a host trainable tensor on the backend (on the CPU the same arrays) */
export function backendTensor<X extends TensorTypes>(be: Backend<X>, t: TrainableTensor): BackendTensor<X["f"]> {
    return {host: t, param: be.param(t.param), grad: be.param(t.grad)};
}

interface BackendLora<F> {
    r: number;
    scaling: number;
    dropout: number;
    A: BackendTensor<F>; // [r, in]
    B: BackendTensor<F>; // [out, r]
    Ac: F; // compute copies
    Bc: F;
    magnitude: BackendTensor<F> | null; // DoRA [out]
}

/** what forward hands to backward */
interface Saved<F> {
    xa: F; // [M, r]
    inner: F | null; // DoRA: bt + lt [M, out]
}

export class Projection<X extends TensorTypes> implements GraphLinear<X["f"]> {
    private readonly lora: BackendLora<X["f"]> | null = null;
    /** the bias as the forward adds it (compute dtype), and its fp32 master when it trains */
    private bias: X["f"] | null = null;
    private readonly trainedBias: BackendTensor<X["f"]> | null = null;
    /** DoRA's k = m / norm and norm [out], for the current weights */
    private doraScale: {k: X["f"]; norm: X["f"]} | null = null;
    /** the trainable tensors, in the host layer's trainableTensors() order */
    readonly tensors: BackendTensor<X["f"]>[] = [];
    private readonly seed: (() => number) | null;
    /** the token rows of the micro-batch before this process's (a rank of a data-parallel run: DropoutClock.rowOffset) */
    private readonly maskRowOffset: () => number;

    constructor(
        private readonly be: Backend<X>,
        private readonly base: FrozenWeight<X["f"]>,
        /** the host layer: the frozen base itself, or a LoraLinear around it holding the trainable tensors */
        readonly host: LinearLayer
    ) {
        const lora = host instanceof LoraLinear ? host : null;
        const onBackend = new Map<Float32Array, BackendTensor<X["f"]>>();
        for (const t of lora?.trainableTensors() ?? []) {
            const bt = backendTensor(be, t);
            onBackend.set(t.param, bt);
            this.tensors.push(bt);
        }
        const w = lora?.lora;
        if (w) {
            const A = onBackend.get(w.A)!,
                B = onBackend.get(w.B)!;
            this.lora = {
                r: w.r,
                scaling: w.scaling,
                dropout: w.dropout,
                A,
                B,
                Ac: be.computeCopy(A.param, w.A.length, null),
                Bc: be.computeCopy(B.param, w.B.length, null),
                magnitude: w.magnitude ? onBackend.get(w.magnitude)! : null
            };
        }
        const bias = host.bias;
        if (bias) {
            this.trainedBias = onBackend.get(bias) ?? null;
            const master = this.trainedBias?.param ?? be.param(bias);
            this.bias = be.computeCopy(master, bias.length, null);
            if (!this.trainedBias && this.bias !== master) be.free(master);
        }
        const src = lora?.dropoutSource;
        this.seed = src ? () => src.clock.seedFor(src.projection) : null;
        this.maskRowOffset = src ? () => src.clock.rowOffset : () => 0;
    }

    get inFeatures(): number {
        return this.base.inFeatures;
    }
    get outFeatures(): number {
        return this.base.outFeatures;
    }

    /** the dropout seed of this projection in the current micro-batch, or null when the branch has no dropout */
    private dropoutSeed(train: boolean): number | null {
        if (!train || !this.lora || this.lora.dropout <= 0) return null;
        if (!this.seed) throw new Error(`${(this.host as LoraLinear).module}: dropout in training needs a DropoutClock`);
        return this.seed();
    }

    /** drop(x) in a new tensor, or null without dropout; x is rows [firstRow, firstRow + M) of the layer's input */
    private dropped(x: X["f"], M: number, seed: number | null, firstRow: number): X["f"] | null {
        if (seed === null) return null;
        const n = M * this.inFeatures,
            out = this.be.activation(n);
        this.be.dropout(out, x, seed, this.lora!.dropout, n, (firstRow + this.maskRowOffset()) * this.inFeatures);
        return out;
    }

    /** DoRA's k = m / ||W + s B A||_row and the norm, from the fp32 masters (as PEFT computes the norm in fp32) */
    private dora(): {k: X["f"]; norm: X["f"]} {
        if (this.doraScale) return this.doraScale;
        const be = this.be,
            l = this.lora!,
            N = this.outFeatures,
            K = this.inFeatures;
        const W = be.stats(N * K);
        this.base.weightInto(W);
        be.gemm(false, false, N, K, l.r, l.scaling, l.B.param, l.A.param, 1, W);
        const norm = be.stats(N),
            k = be.stats(N);
        be.rowNorms(norm, W, N, K);
        be.free(W);
        be.divide(k, l.magnitude!.param, norm, N);
        this.doraScale = {k, norm};
        return this.doraScale;
    }

    forward(y: X["f"], x: X["f"], M: number, train: boolean, firstRow = 0): Saved<X["f"]> | null {
        const be = this.be,
            l = this.lora,
            N = this.outFeatures,
            K = this.inFeatures;
        let saved: Saved<X["f"]> | null = null;
        if (!l) this.base.product(y, x, M, !train);
        else {
            const seed = this.dropoutSeed(train);
            const xd = this.dropped(x, M, seed, firstRow);
            const xa = be.activation(M * l.r);
            // decoding: the skinny kernel where the backend has one (a GEMM of M <= 8 rows is mostly overhead)
            if (train || !be.loraDownGroup?.(x, M, K, [{out: xa, A: l.Ac, r: l.r}]))
                be.gemm(false, true, M, l.r, K, 1, xd ?? x, l.Ac, 0, xa);
            if (!l.magnitude) {
                this.baseWithLora(y, x, xa, M, train || xd !== null);
                saved = {xa, inner: null};
            } else {
                const {k} = this.dora();
                const inner = be.activation(M * N);
                if (!xd) {
                    // y = k (x W^T + lt)
                    this.base.product(inner, x, M, !train);
                    be.gemm(false, true, M, N, l.r, l.scaling, xa, l.Bc, 1, inner);
                    be.scaleColumns(y, inner, k, 0, M, N, false);
                } else {
                    // y = x W^T + (k - 1) bt + k lt
                    this.base.product(y, x, M, false);
                    this.base.product(inner, xd, M, false);
                    be.scaleColumns(y, inner, k, -1, M, N, true);
                    const lt = be.activation(M * N);
                    be.gemm(false, true, M, N, l.r, l.scaling, xa, l.Bc, 0, lt);
                    be.scaleColumns(y, lt, k, 0, M, N, true);
                    be.addInplace(inner, lt, M * N);
                    be.free(lt);
                }
                saved = {xa, inner};
            }
            be.free(xd);
        }
        if (this.bias) be.addBias(y, this.bias, M, N);
        if (saved && !train) {
            this.release(saved);
            return null;
        }
        return saved;
    }

    /**
     * y = x W^T + s xa B^T (xa = x A^T given). Decoding: in one pass where the weight has a fused kernel;
     * `exact` (training, or an xa from dropped inputs) keeps the GEMM for the base: the backward's product must
     * match the forward's
     */
    private baseWithLora(y: X["f"], x: X["f"], xa: X["f"], M: number, exact: boolean): void {
        const l = this.lora!;
        if (!exact && this.base.productWithLora?.(y, x, M, this.loraTerm(xa))) return;
        this.base.product(y, x, M, !exact);
        this.be.gemm(false, true, M, this.outFeatures, l.r, l.scaling, xa, l.Bc, 1, y);
    }

    private loraTerm(xa: X["f"]): LoraTerm<X["f"]> {
        const l = this.lora!;
        return {xa, B: l.Bc, r: l.r, scale: l.scaling};
    }

    /**
     * Decoding q, k and v (or gate and up) of one input: every LoRA down product x A^T in one pass, then every
     * base product with its LoRA update in one fused launch, where the backend has the kernels (else the same
     * math one projection at a time). Only plain LoRA or no adapter on the same backend and input width: DoRA
     * and other layers return false.
     */
    forwardShared(others: GraphLinear<X["f"]>[], ys: X["f"][], x: X["f"], M: number): boolean {
        const group: Projection<X>[] = [this];
        for (const o of others) {
            if (!(o instanceof Projection) || o.be !== this.be || o.inFeatures !== this.inFeatures) return false;
            group.push(o as Projection<X>);
        }
        if (group.some((p) => p.lora?.magnitude)) return false;
        const be = this.be,
            K = this.inFeatures;
        const withLora = group.filter((p) => p.lora);
        const xas = new Map(withLora.map((p) => [p, be.activation(M * p.lora!.r)]));
        const downs = withLora.map((p) => ({out: xas.get(p)!, A: p.lora!.Ac, r: p.lora!.r}));
        if (downs.length > 0 && !be.loraDownGroup?.(x, M, K, downs))
            for (const d of downs) be.gemm(false, true, M, d.r, K, 1, x, d.A, 0, d.out);
        const parts = group.map((p, i) => {
            const xa = xas.get(p);
            return {weight: p.base, y: ys[i], lora: xa ? p.loraTerm(xa) : null, bias: p.bias};
        });
        // the fused launch adds the biases too (Qwen2's q, k and v have them)
        if (!this.base.productGroup?.(parts, x, M))
            group.forEach((p, i) => {
                const xa = xas.get(p);
                if (xa) p.baseWithLora(ys[i], x, xa, M, false);
                else p.base.product(ys[i], x, M, true);
                if (p.bias) be.addBias(ys[i], p.bias, M, p.outFeatures);
            });
        for (const xa of xas.values()) be.free(xa);
        return true;
    }

    /**
     * what backward needs of a training forward of x without its product: LoRA's xa = drop(x) A^T (DoRA: the whole
     * forward, whose output it needs); null without LoRA
     */
    saveForBackward(x: X["f"], M: number, firstRow = 0): Saved<X["f"]> | null {
        const be = this.be,
            l = this.lora;
        if (!l) return null;
        if (l.magnitude) {
            const y = be.activation(M * this.outFeatures);
            const saved = this.forward(y, x, M, true, firstRow);
            be.free(y);
            return saved;
        }
        const xd = this.dropped(x, M, this.dropoutSeed(true), firstRow);
        const xa = be.activation(M * l.r);
        be.gemm(false, true, M, l.r, this.inFeatures, 1, xd ?? x, l.Ac, 0, xa);
        be.free(xd);
        return {xa, inner: null};
    }

    backward(dx: X["f"], dy: X["f"], x: X["f"], saved: unknown, M: number, accumulate: boolean, firstRow = 0): void {
        const be = this.be,
            l = this.lora,
            s = saved as Saved<X["f"]> | null,
            N = this.outFeatures,
            K = this.inFeatures;
        if (this.trainedBias) be.columnSums(this.trainedBias.grad, dy, null, null, M, N);
        if (!l || !s) {
            this.base.productTranspose(dx, dy, M, accumulate);
            return;
        }
        const seed = this.dropoutSeed(true);
        // the LoRA branch's output gradient: dy, or dy * k under DoRA
        let g = dy,
            scaled: X["f"] | null = null;
        if (l.magnitude && s.inner) {
            const {k, norm} = this.dora();
            be.columnSums(l.magnitude.grad, dy, s.inner, norm, M, N);
            scaled = be.activation(M * N);
            if (seed === null) {
                // dx = (k dy) W: the base and (k - 1) terms together
                be.scaleColumns(scaled, dy, k, 0, M, N, false);
                this.base.productTranspose(dx, scaled, M, accumulate);
            } else {
                // dx = dy W + (((k - 1) dy) W) * mask
                this.base.productTranspose(dx, dy, M, accumulate);
                const t = be.activation(M * K);
                be.scaleColumns(scaled, dy, k, -1, M, N, false);
                this.base.productTranspose(t, scaled, M, false);
                be.dropoutAdd(dx, t, seed, l.dropout, M * K, (firstRow + this.maskRowOffset()) * K);
                be.free(t);
                be.scaleColumns(scaled, dy, k, 0, M, N, false);
            }
            g = scaled;
        } else this.base.productTranspose(dx, dy, M, accumulate);
        // dB[out, r] += s g^T xa
        be.gemm(true, false, N, l.r, M, l.scaling, g, s.xa, 1, l.B.grad);
        // dxa[M, r] = s g B
        const dxa = be.activation(M * l.r);
        be.gemm(false, false, M, l.r, N, l.scaling, g, l.Bc, 0, dxa);
        be.free(scaled);
        // dA[r, in] += dxa^T drop(x)
        const xd = this.dropped(x, M, seed, firstRow);
        be.gemm(true, false, l.r, K, M, 1, dxa, xd ?? x, 1, l.A.grad);
        // dx += (dxa A) * mask
        if (xd) {
            // drop(x) is no longer needed: it becomes the [M, in] temporary
            be.gemm(false, false, M, K, l.r, 1, dxa, l.Ac, 0, xd);
            be.dropoutAdd(dx, xd, seed!, l.dropout, M * K, (firstRow + this.maskRowOffset()) * K);
            be.free(xd);
        } else be.gemm(false, false, M, K, l.r, 1, dxa, l.Ac, 1, dx);
        be.free(dxa);
    }

    release(saved: unknown): void {
        const s = saved as Saved<X["f"]> | null;
        if (!s) return;
        this.be.free(s.xa);
        this.be.free(s.inner);
    }

    afterUpdate(): void {
        const be = this.be,
            l = this.lora;
        if (l) {
            be.computeCopy(l.A.param, l.A.host.param.length, l.Ac);
            be.computeCopy(l.B.param, l.B.host.param.length, l.Bc);
        }
        if (this.trainedBias) be.computeCopy(this.trainedBias.param, this.trainedBias.host.param.length, this.bias);
        if (this.doraScale) {
            be.free(this.doraScale.k);
            be.free(this.doraScale.norm);
            this.doraScale = null;
        }
    }
}
