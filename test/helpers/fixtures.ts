// fixtures.ts: the golden batch of ../shared/fixtures/ref-qwen2 as a training batch, the error measure the
// fixtures' README uses for gradients, and the central difference the gradient tests check against.
import path from "node:path";
import {SafetensorsFile} from "../../src/io/safetensors.js";
import type {TrainBatch} from "../../src/model/training.js";
import {FIXTURES} from "./paths.js";

export async function fixtureBatch(): Promise<TrainBatch> {
    const f = await SafetensorsFile.open(path.join(FIXTURES, "batch.safetensors"));
    const inputIds = await f.readI32("input_ids");
    const mask = await f.readI32("attention_mask");
    const labels = await f.readI32("labels");
    const [B, T] = f.info("input_ids").shape;
    await f.close();
    const positionIds = new Int32Array(B * T).map((_, i) => i % T);
    return {B, T, inputIds, labels, attentionMask: Uint8Array.from(mask), positionIds, segIds: null};
}

export function relL2(a: Float32Array, b: Float32Array): number {
    let num = 0,
        den = 0;
    for (let i = 0; i < a.length; i++) {
        num += (a[i] - b[i]) ** 2;
        den += b[i] ** 2;
    }
    return Math.sqrt(num / den);
}

/** (loss(p + eps) - loss(p - eps)) / (2 eps) for element i of param, which is left as it was */
export function centralDifference(param: Float32Array, i: number, eps: number, loss: () => number): number {
    const v = param[i];
    param[i] = v + eps;
    const lp = loss();
    param[i] = v - eps;
    const lm = loss();
    param[i] = v;
    return (lp - lm) / (2 * eps);
}
