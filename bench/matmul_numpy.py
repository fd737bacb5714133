#!/usr/bin/env python3
"""Peer benchmark for bench/matmul.ts: numpy (OpenBLAS) float32 matmul on the same shapes.

Reads JSON from stdin: {"shapes": [{"label", "M", "N", "K", "transA", "transB"}, ...],
                        "minTime": seconds per shape (optional), "maxReps": int (optional)}
Prints JSON to stdout: {"ok": true, "blas": "...", "threads": n, "results": [{"label", "seconds", "gflops"}]}
The thread count is pinned by the caller through OPENBLAS_NUM_THREADS (read at import time).
"""
import json
import os
import sys
import time


def main():
    req = json.load(sys.stdin)
    try:
        import numpy as np
    except Exception as e:  # numpy missing: report, don't crash
        print(json.dumps({"ok": False, "error": f"numpy not importable: {e}"}))
        return
    blas = "numpy " + np.__version__
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg.get("Build Dependencies", {}).get("blas", {})
        blas += f" / {b.get('name', '?')} {b.get('version', '')}".rstrip()
    except Exception:
        pass
    threads = None
    try:
        from threadpoolctl import threadpool_info  # optional
        threads = [p.get("num_threads") for p in threadpool_info() if p.get("user_api") == "blas"]
    except Exception:
        threads = os.environ.get("OPENBLAS_NUM_THREADS")

    min_time = float(req.get("minTime", 0.25))
    max_reps = int(req.get("maxReps", 2000))
    rng = np.random.default_rng(0)
    results = []
    for s in req["shapes"]:
        M, N, K = int(s["M"]), int(s["N"]), int(s["K"])
        ta, tb = bool(s.get("transA")), bool(s.get("transB"))
        # stored layouts: A is [K,M] when transposed, else [M,K]; B is [N,K] when transposed, else [K,N]
        A = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
        B = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
        opA = A.T if ta else A
        opB = B.T if tb else B
        C = np.empty((M, N), dtype=np.float32)
        np.matmul(opA, opB, out=C)  # warm-up
        np.matmul(opA, opB, out=C)
        best = float("inf")
        t_start = time.perf_counter()
        reps = 0
        while reps < 3 or (time.perf_counter() - t_start < min_time and reps < max_reps):
            t0 = time.perf_counter()
            np.matmul(opA, opB, out=C)
            dt = time.perf_counter() - t0
            best = min(best, dt)
            reps += 1
        results.append({"label": s["label"], "seconds": best, "gflops": 2.0 * M * N * K / best / 1e9,
                        "reps": reps})
    print(json.dumps({"ok": True, "blas": blas, "threads": threads, "results": results}))


if __name__ == "__main__":
    main()
