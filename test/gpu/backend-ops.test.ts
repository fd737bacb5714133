// backend-ops.test.ts (GPU): the Backend op table (test/helpers/backend-ops.ts) on the CUDA backend: bf16
// activations, the CUDA kernels, against the same float64 references and finite differences as the CPU rows
// (test/backend-ops.test.ts), with the bf16 tolerances the table gives. Skipped, with the reason, where no GPU is
// usable (npm run test:gpu; on the GPU machine: bash scripts/device-run.sh test backend-ops).
import {cudaAvailability} from "../../src/backend/cuda.js";
import {cudaIo, registerBackendOpTests} from "../helpers/backend-ops.js";

const availability = cudaAvailability();
registerBackendOpTests(cudaIo, availability.usable ? null : (availability.reason ?? "CUDA is not usable"));
