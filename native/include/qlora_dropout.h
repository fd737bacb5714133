// qlora_dropout.h: the dropout masks of LoRA's input, written once for the CPU and the GPU. Element i of a
// tensor is kept when a splitmix64 hash of (seed, i) gives 24 random bits >= p; the seed names the run, the
// training micro-batch and the projection (src/backend/dropout.ts). The mask is a pure function of (seed, i,
// p): both devices draw the same masks, and a block recomputed under gradient checkpointing needs no replay.
#pragma once
#include <stdint.h>
#include "qlora_float.h"

QLORA_HD QLORA_INLINE bool qlora_dropout_keep(uint64_t seed, uint64_t i, float p) {
    uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    float u = (float)(z >> 40) * (1.0f / 16777216.0f);  // 24 random bits in [0, 1): exact in float
    return u >= p;
}
