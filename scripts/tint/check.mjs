// Compiles every shader module and pipeline variant of wgpu-batchnorm with
// Tint, the WGSL compiler of Dawn (Chrome, Edge), through Dawn for Node.js.
//
// usage: node check.mjs MANIFEST.json BACKEND
//   MANIFEST: written by the crate's test `kernels::portability` (modules
//     with their WGSL, pipelines with entry point, override constants and
//     bind group layout)
//   BACKEND: `null` (Dawn validates and compiles to nothing: every WGSL,
//     uniformity and pipeline rule, in milliseconds) or `vulkan` (a real
//     device: Dawn's Vulkan backend on whatever driver the Vulkan loader
//     finds, e.g. SwiftShader with VK_ICD_FILENAMES)
//
// Every message is a failure: compilation messages of any type (errors,
// warnings, notes) and every error an error scope catches. The device keeps
// WebGPU's default limits, so a pipeline that needs more than any WebGPU
// implementation must give fails here. Prints one line per failure and a
// summary; exits 1 if anything failed, 2 if no device could be made.
import fs from 'node:fs';
import { create, globals } from 'webgpu';

Object.assign(globalThis, globals);

const [manifestPath, backend] = process.argv.slice(2);
if (!manifestPath || !['null', 'vulkan'].includes(backend)) {
  console.error('usage: node check.mjs MANIFEST.json null|vulkan');
  process.exit(2);
}
const manifest = JSON.parse(fs.readFileSync(manifestPath, 'utf8'));

const gpu = create([`backend=${backend}`]);
const adapter = await gpu.requestAdapter();
if (!adapter) {
  console.error(`no Dawn adapter on backend ${backend}` +
    (backend === 'vulkan' ? ' (is VK_ICD_FILENAMES pointing at a driver Dawn accepts, e.g. SwiftShader?)' : ''));
  process.exit(2);
}
const wanted = manifest.features.filter((f) => adapter.features.has(f));
const missing = manifest.features.filter((f) => !adapter.features.has(f));
if (missing.length) {
  console.error(`the ${backend} adapter lacks features ${missing.join(', ')}`);
  process.exit(2);
}
const device = await adapter.requestDevice({ requiredFeatures: wanted });
const info = adapter.info;
console.log(`tint: ${backend} adapter ${info.vendor} ${info.architecture} ${info.description}`.replace(/\s+/g, ' '));

const failures = [];
const filters = ['validation', 'out-of-memory', 'internal'];

async function scoped(what, make) {
  for (const f of filters) device.pushErrorScope(f);
  const made = make();
  const errors = [];
  for (let i = 0; i < filters.length; i++) {
    const e = await device.popErrorScope();
    if (e) errors.push(e.message);
  }
  for (const e of errors) failures.push(`${what}: ${e}`);
  return made;
}

const modules = [];
for (const m of manifest.modules) {
  const module = await scoped(`module ${m.label}`, () => device.createShaderModule({ label: m.label, code: m.code }));
  const compiled = await module.getCompilationInfo();
  for (const msg of compiled.messages) {
    failures.push(`module ${m.label}: ${msg.type} at ${msg.lineNum}:${msg.linePos}: ${msg.message}`);
  }
  modules.push(module);
}

const bindingType = (kind) => {
  switch (kind) {
    case 'uniform': return 'uniform';
    case 'storage': return 'storage';
    case 'read-only-storage': return 'read-only-storage';
    default: throw new Error(`unknown binding kind ${kind}`);
  }
};

for (const p of manifest.pipelines) {
  const what = `pipeline ${p.label}`;
  await scoped(what, () => {
    const bindGroupLayout = device.createBindGroupLayout({
      label: p.label,
      entries: p.bindings.map((b) => ({
        binding: b.binding,
        visibility: GPUShaderStage.COMPUTE,
        buffer: {
          type: bindingType(b.kind),
          hasDynamicOffset: b.dynamicOffset,
          minBindingSize: b.minBindingSize,
        },
      })),
    });
    return device.createComputePipeline({
      label: p.label,
      layout: device.createPipelineLayout({ bindGroupLayouts: [bindGroupLayout] }),
      compute: { module: modules[p.module], entryPoint: p.entryPoint, constants: p.constants },
    });
  });
}

for (const f of failures) console.log(`FAIL ${f}`);
console.log(`tint ${backend}: ${manifest.modules.length} modules, ${manifest.pipelines.length} pipelines, ` +
  `${failures.length} failures`);
device.destroy();
process.exit(failures.length ? 1 : 0);
