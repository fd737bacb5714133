// train-config.ts: the train config schema for API users; it lives with the trainer in src/train/config.ts.
export * from "../train/config.js";
