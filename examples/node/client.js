#!/usr/bin/env node
// normserve from Node.js, with @grpc/grpc-js and @grpc/proto-loader (the
// .proto files of ../../proto are loaded at run time; no code generation).
//
// Creates a BatchNorm session, trains it for a few steps, runs one batch in
// eval mode, reads the session's state back, deletes the session, and prints
// everything as one JSON object on stdout:
//
//   npm ci && node client.js [--addr 127.0.0.1:50051] [--kind 2d] [--num-features 3]
//                            [--steps 3] [--inputs batches.json] [--token T]
//
// --inputs names a JSON file {"shape": [N, C, ...], "train": [[...], ...],
// "eval": [...]}: flat row-major float32 values, one array per train step.
// Without it, a fixed demo batch (seeded) is used for every step.
// Exit codes: 0 done, 1 the server answered with an error, 2 bad usage.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_DIR = path.resolve(__dirname, "..", "..", "proto");

function usage(message) {
  process.stderr.write(`client.js: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const args = { addr: "127.0.0.1:50051", kind: "2d", numFeatures: 3, steps: 3, inputs: null, token: null };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = argv[i + 1];
    if (value === undefined) usage(`${flag} needs a value`);
    i++;
    switch (flag) {
      case "--addr": args.addr = value; break;
      case "--kind":
        if (!["1d", "2d", "3d"].includes(value)) usage(`--kind must be 1d, 2d or 3d, got ${value}`);
        args.kind = value;
        break;
      case "--num-features": args.numFeatures = positiveInt(flag, value); break;
      case "--steps": args.steps = positiveInt(flag, value); break;
      case "--inputs": args.inputs = value; break;
      case "--token": args.token = value; break;
      default: usage(`unknown option ${flag}`);
    }
  }
  return args;
}

function positiveInt(flag, value) {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) usage(`${flag} must be a positive integer, got ${value}`);
  return n;
}

// Tensors travel as raw little-endian bytes (normserve.v1.Tensor.raw), the
// fast path; typed float_values/double_values are for JSON clients.
function toTensor(shape, values) {
  const expected = shape.reduce((a, b) => a * b, 1);
  if (values.length !== expected) throw new Error(`${values.length} values for shape [${shape}] (${expected} expected)`);
  const raw = Buffer.alloc(4 * values.length);
  values.forEach((v, i) => raw.writeFloatLE(v, 4 * i));
  return { dtype: "DATA_TYPE_FLOAT32", shape: shape.map(String), raw };
}

function fromTensor(tensor) {
  if (!tensor) return null;
  const shape = tensor.shape.map(Number);
  let values;
  if (tensor.values === "raw") {
    const width = { DATA_TYPE_FLOAT32: 4, DATA_TYPE_FLOAT64: 8 }[tensor.dtype];
    if (!width) throw new Error(`this example decodes float32/float64 only, got ${tensor.dtype}`);
    values = [];
    for (let offset = 0; offset < tensor.raw.length; offset += width) {
      values.push(width === 4 ? tensor.raw.readFloatLE(offset) : tensor.raw.readDoubleLE(offset));
    }
  } else if (tensor.values === "floatValues") {
    values = tensor.floatValues.values;
  } else if (tensor.values === "doubleValues") {
    values = tensor.doubleValues.values;
  } else {
    values = [];
  }
  return { dtype: tensor.dtype, shape, values };
}

// A deterministic demo batch (xorshift32 -> roughly uniform in [-2, 2)), so
// that the example needs no input file.
function demoInputs(kind, numFeatures) {
  const shape = { "1d": [4, numFeatures], "2d": [2, numFeatures, 3, 3], "3d": [2, numFeatures, 2, 2, 2] }[kind];
  let state = 2463534242;
  const random = () => {
    state ^= state << 13; state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5; state >>>= 0;
    return state / 2 ** 32 * 4 - 2;
  };
  const count = shape.reduce((a, b) => a * b, 1);
  const batch = () => Array.from({ length: count }, random);
  return { shape, train: null, eval: batch(), batch };
}

function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + 30000 }, (error, response) => {
      if (error) {
        error.rpc = method;
        reject(error);
      } else {
        resolve(response);
      }
    });
  });
}

function sessionState(session) {
  return {
    session_id: session.sessionId,
    device: session.device,
    version: Number(session.version),
    num_batches_tracked: Number(session.numBatchesTracked),
    eps: session.config.eps,
    momentum: session.config.momentum,
    weight: fromTensor(session.weight),
    bias: fromTensor(session.bias),
    running_mean: fromTensor(session.runningMean),
    running_var: fromTensor(session.runningVar),
  };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  let inputs;
  if (args.inputs) {
    try {
      inputs = JSON.parse(fs.readFileSync(args.inputs, "utf8"));
    } catch (error) {
      usage(`cannot read --inputs ${args.inputs}: ${error.message}`);
    }
    if (!Array.isArray(inputs.shape) || !Array.isArray(inputs.train) || !Array.isArray(inputs.eval)) {
      usage(`--inputs ${args.inputs} needs "shape", "train" (one array per step) and "eval"`);
    }
    args.steps = inputs.train.length;
  } else {
    inputs = demoInputs(args.kind, args.numFeatures);
    inputs.train = Array.from({ length: args.steps }, inputs.batch);
  }

  const definition = protoLoader.loadSync(
    ["normserve/v1/batch_norm.proto", "normserve/v1/server.proto"],
    // keepCase false: fields are camelCase (sessionId); enums as their names;
    // 64-bit integers as strings (no precision loss); oneofs name their case.
    { includeDirs: [PROTO_DIR], longs: String, enums: String, defaults: true, oneofs: true },
  );
  const v1 = grpc.loadPackageDefinition(definition).normserve.v1;
  const options = {
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    "grpc.max_send_message_length": 64 * 1024 * 1024,
  };
  const credentials = grpc.credentials.createInsecure();
  const batchNorm = new v1.BatchNormService(args.addr, credentials, options);
  const server = new v1.ServerService(args.addr, credentials, options);
  const metadata = new grpc.Metadata();
  if (args.token) metadata.set("authorization", `Bearer ${args.token}`);

  try {
    const info = await call(server, "getServerInfo", {}, metadata);
    const kind = { "1d": "BATCH_NORM_1D", "2d": "BATCH_NORM_2D", "3d": "BATCH_NORM_3D" }[args.kind];
    const created = await call(batchNorm, "createSession", {
      kind, numFeatures: String(args.numFeatures), labels: { client: "node-example" },
    }, metadata);
    const sessionId = created.session.sessionId;
    let train, evalReply, state;
    try {
      train = [];
      for (const batch of inputs.train) {
        const reply = await call(batchNorm, "forward", {
          sessionId, mode: "MODE_TRAIN", input: toTensor(inputs.shape, batch),
          // A retry with the same id would be answered, not applied twice.
          requestId: `node-example-train-${train.length}`,
        }, metadata);
        train.push({ output: fromTensor(reply.output), version: Number(reply.version),
                     num_batches_tracked: Number(reply.numBatchesTracked) });
      }
      evalReply = await call(batchNorm, "forward", {
        sessionId, mode: "MODE_EVAL", input: toTensor(inputs.shape, inputs.eval),
      }, metadata);
      state = await call(batchNorm, "getSession", { sessionId }, metadata);
    } finally {
      // The example leaves nothing behind, also when a call failed.
      await call(batchNorm, "deleteSession", { sessionId }, metadata).catch(() => {});
    }
    const result = {
      server: { version: info.serverVersion, libtorch: info.libtorchVersion },
      kind: args.kind,
      shape: inputs.shape,
      train,
      eval: { output: fromTensor(evalReply.output), version: Number(evalReply.version) },
      state: sessionState(state.session),
    };
    process.stdout.write(JSON.stringify(result) + "\n");
  } catch (error) {
    const code = error.code !== undefined ? grpc.status[error.code] : "";
    process.stderr.write(`client.js: ${error.rpc || "error"}: ${code} ${error.details || error.message}\n`);
    process.exitCode = error.code !== undefined && error.code !== grpc.status.UNAVAILABLE ? 1 : 2;
  } finally {
    batchNorm.close();
    server.close();
  }
}

main();
