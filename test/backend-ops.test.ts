// backend-ops.test.ts: the Backend op table (test/helpers/backend-ops.ts) on the CPU backend: fp32 activations,
// the native CPU ops, against float64 references and finite differences. The same table runs on the CUDA backend
// in test/gpu/backend-ops.test.ts.
import {cpuIo, registerBackendOpTests} from "./helpers/backend-ops.js";

registerBackendOpTests(cpuIo);
