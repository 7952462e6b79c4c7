// The browser demo: loads CIFAR-10, runs speedrun's training loop (src/web.rs, compiled to
// wasm) on WebGPU, and draws its progress. The page's state is in document.body.dataset.state
// (starting, no-webgpu, idle, loading, ready, training, done, stopped, error) for tests.
import init, { adapter_info, recipes, train } from './pkg/speedrun.js';

const CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'];
const RECORD = 3073; // a label byte, then 32×32 R, G and B planes
const TRAIN_FILES = [1, 2, 3, 4, 5].map(i => `data_batch_${i}.bin`);
const TEST_FILE = 'test_batch.bin';
const $ = id => document.getElementById(id);

const data = { train: [], test: null }; // Uint8Arrays of records, train in file order
let stopRequested = false;
let checkpoint = null;
let run = null; // the current run's chart data

function setState(state, message, isError = false) {
  document.body.dataset.state = state;
  if (message !== undefined) {
    $('status').textContent = message;
    $('status').className = isError ? 'error' : '';
  }
  const busy = state === 'loading' || state === 'training';
  const haveData = data.test !== null && data.train.length > 0;
  $('start').disabled = busy || !haveData || state === 'no-webgpu';
  $('stop').disabled = state !== 'training';
  $('load-server').disabled = busy || !$('load-server').dataset.available;
  $('file').disabled = busy;
  $('download').disabled = checkpoint === null || busy;
}

// Fetches `url` with progress reported as bytes read so far.
async function fetchBytes(url, onBytes) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  const reader = response.body.getReader();
  const chunks = [];
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    onBytes(value.length);
  }
  return concat(chunks);
}

// The training files needed for the "train images" knob, and the test file, from /data/.
async function loadFromServer() {
  const trainCount = Math.ceil(Math.min(50000, +$('train-limit').value) / 10000);
  const names = [...TRAIN_FILES.slice(0, trainCount), TEST_FILE];
  setState('loading', `Loading ${names.length} files from the server…`);
  const progress = $('data-progress');
  progress.max = names.length * 10000 * RECORD;
  progress.value = 0;
  try {
    const files = await Promise.all(names.map(n => fetchBytes(`data/${n}`, b => { progress.value += b; })));
    data.test = files.pop();
    data.train = files;
    dataLoaded('this server');
  } catch (e) {
    setState('idle', `Could not load the data: ${e.message}`, true);
  }
}

// cifar-10-binary.tar.gz, gunzipped by the browser and untarred here.
async function loadArchive(file) {
  setState('loading', `Unpacking ${file.name}…`);
  const progress = $('data-progress');
  progress.max = file.size;
  progress.value = 0;
  try {
    const counted = file.stream().pipeThrough(new TransformStream({
      transform(chunk, controller) { progress.value += chunk.length; controller.enqueue(chunk); },
    }));
    const tar = new Uint8Array(await new Response(counted.pipeThrough(new DecompressionStream('gzip'))).arrayBuffer());
    const found = {};
    for (let at = 0; at + 512 <= tar.length;) {
      const name = new TextDecoder().decode(tar.subarray(at, at + 100)).replace(/\0.*$/s, '');
      if (!name) break;
      const size = parseInt(new TextDecoder().decode(tar.subarray(at + 124, at + 136)).replace(/\0.*$/s, '').trim(), 8);
      found[name.split('/').pop()] = tar.subarray(at + 512, at + 512 + size);
      at += 512 + Math.ceil(size / 512) * 512;
    }
    if (!found[TEST_FILE] || !found[TRAIN_FILES[0]]) throw new Error('no CIFAR-10 binary batches in this archive');
    data.test = found[TEST_FILE];
    data.train = TRAIN_FILES.filter(n => found[n]).map(n => found[n]);
    dataLoaded(file.name);
  } catch (e) {
    setState('idle', `Could not read ${file.name}: ${e.message}`, true);
  }
}

function dataLoaded(source) {
  const trainImages = data.train.reduce((n, f) => n + f.length / RECORD, 0);
  $('data-status').textContent = `${trainImages} training and ${data.test.length / RECORD} test images from ${source}.`;
  setState('ready', 'Ready to train.');
  drawGrid(null);
}

function concat(arrays) {
  const out = new Uint8Array(arrays.reduce((n, a) => n + a.length, 0));
  let at = 0;
  for (const a of arrays) { out.set(a, at); at += a.length; }
  return out;
}

async function start() {
  const options = {
    recipe: $('recipe').value, epochs: +$('epochs').value, batch_size: +$('batch').value, lr: +$('lr').value, seed: +$('seed').value,
    widths: $('widths').value.split(',').map(Number),
    train_limit: +$('train-limit').value, test_limit: +$('test-limit').value,
    precision: $('half').checked ? 'half' : 'f32',
  };
  const trainRecords = concat(data.train.slice(0, Math.ceil(options.train_limit / 10000)));
  stopRequested = false;
  checkpoint = null;
  run = { total: 1, losses: [], accs: [] };
  $('epoch-table').tBodies[0].innerHTML = '';
  setState('training', 'Compiling shaders and uploading the data…');
  try {
    checkpoint = await train(trainRecords, data.test, JSON.stringify(options), onEvent);
    setState('done', `Done: ${$('status').dataset.summary}`);
  } catch (e) {
    const message = String(e.message || e);
    setState(message.startsWith('stopped') ? 'stopped' : 'error', message, !message.startsWith('stopped'));
  }
}

// Called by the wasm run loop with one JSON event; returning true stops the run.
function onEvent(json) {
  const e = JSON.parse(json);
  if (e.kind === 'start') {
    run.total = e.steps;
    const storage = e.precision === 'half' ? 'f16 activations (shader-f16)' : 'f32 activations';
    setState('training', `Training on ${e.device}, ${storage}: ${e.train_images} images, ${e.steps} steps of ${e.batch_size}.`);
  } else if (e.kind === 'progress') {
    run.losses.push([e.step, e.train_loss]);
    $('stat-step').textContent = `${e.step}/${run.total}`;
    $('stat-speed').textContent = Math.round(e.images_per_second);
    $('stat-time').textContent = e.seconds.toFixed(1);
    $('run-progress').value = e.step / run.total;
  } else if (e.kind === 'epoch') {
    const stepsDone = Math.min(run.total, Math.round(run.total * e.epoch / +$('epochs').value));
    run.accs.push([stepsDone, e.val_acc]);
    const row = $('epoch-table').tBodies[0].insertRow();
    const tta = e.tta_acc === null ? '' : e.tta_acc.toFixed(4);
    for (const v of [e.epoch, e.train_loss.toFixed(4), e.train_acc.toFixed(4), e.val_acc.toFixed(4), tta, e.seconds.toFixed(2)]) {
      row.insertCell().textContent = v;
    }
    $('stat-acc').textContent = (100 * (e.tta_acc ?? e.val_acc)).toFixed(2) + '%';
    $('stat-time').textContent = e.seconds.toFixed(1);
    drawGrid(e.predictions);
  } else if (e.kind === 'done') {
    $('run-progress').value = 1;
    $('stat-speed').textContent = Math.round(e.images_per_second);
    $('status').dataset.summary = `TTA accuracy ${(100 * e.tta_acc).toFixed(2)}% in ${e.seconds.toFixed(1)} s ` +
      `(${Math.round(e.images_per_second)} training images/s).`;
  }
  drawChart();
  return stopRequested;
}

// Train loss per step (left axis, its range so far) and test accuracy per epoch (right
// axis, 0–100%).
function drawChart() {
  const c = $('chart'), g = c.getContext('2d');
  const [w, h, pad] = [c.width, c.height, 36];
  g.clearRect(0, 0, w, h);
  g.strokeStyle = '#ccc';
  g.strokeRect(pad, 8, w - 2 * pad, h - pad - 8);
  const losses = run.losses.map(p => p[1]);
  const [lo, hi] = losses.length ? [Math.min(...losses), Math.max(...losses)] : [0, 2.5];
  const [minLoss, maxLoss] = [Math.max(0, lo - 0.05 * (hi - lo) - 0.01), hi + 0.05 * (hi - lo) + 0.01];
  const x = s => pad + (w - 2 * pad) * s / run.total;
  const yLoss = l => 8 + (h - pad - 8) * (1 - (l - minLoss) / (maxLoss - minLoss));
  const yAcc = a => 8 + (h - pad - 8) * (1 - a);
  const line = (points, y, color) => {
    g.strokeStyle = g.fillStyle = color;
    g.beginPath();
    points.forEach(([s, v], i) => (i ? g.lineTo(x(s), y(v)) : g.moveTo(x(s), y(v))));
    g.stroke();
    points.forEach(([s, v]) => g.fillRect(x(s) - 2, y(v) - 2, 4, 4));
  };
  line(run.losses, yLoss, '#36c');
  line(run.accs, yAcc, '#2a2');
  g.fillStyle = '#444';
  g.font = '12px system-ui';
  g.fillText(`train loss (${minLoss.toFixed(2)}–${maxLoss.toFixed(2)})`, pad + 4, h - 18);
  g.fillText('test accuracy (0–100%)', w - pad - 140, h - 18);
  g.fillText(`step ${run.losses.length ? run.losses.at(-1)[0] : 0} of ${run.total}`, w / 2 - 40, h - 4);
}

// The first 40 test images, ×2, with the predicted class (green if right) and the true one.
function drawGrid(predictions) {
  const c = $('grid'), g = c.getContext('2d');
  g.clearRect(0, 0, c.width, c.height);
  if (!data.test) return;
  const image = g.createImageData(32, 32);
  for (let i = 0; i < 40; i++) {
    const rec = data.test.subarray(i * RECORD, (i + 1) * RECORD);
    for (let p = 0; p < 1024; p++) {
      image.data.set([rec[1 + p], rec[1025 + p], rec[2049 + p], 255], 4 * p);
    }
    const [x, y] = [(i % 10) * 72, Math.floor(i / 10) * 85];
    const tile = document.createElement('canvas');
    tile.width = tile.height = 32;
    tile.getContext('2d').putImageData(image, 0, 0);
    g.imageSmoothingEnabled = false;
    g.drawImage(tile, x + 4, y, 64, 64);
    g.font = '11px system-ui';
    if (predictions) {
      g.fillStyle = predictions[i] === rec[0] ? '#2a2' : '#c22';
      g.fillText(CLASSES[predictions[i]], x + 4, y + 75);
    }
    g.fillStyle = '#666';
    g.fillText(`(${CLASSES[rec[0]]})`, x + 4, y + 84);
  }
}

async function main() {
  $('load-server').onclick = loadFromServer;
  $('file').onchange = () => $('file').files[0] && loadArchive($('file').files[0]);
  const drop = $('drop');
  drop.ondragover = e => { e.preventDefault(); drop.classList.add('over'); };
  drop.ondragleave = () => drop.classList.remove('over');
  drop.ondrop = e => { e.preventDefault(); drop.classList.remove('over'); if (e.dataTransfer.files[0]) loadArchive(e.dataTransfer.files[0]); };
  $('start').onclick = start;
  $('stop').onclick = () => { stopRequested = true; $('status').textContent = 'Stopping…'; };
  $('download').onclick = () => {
    const a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([checkpoint], { type: 'application/octet-stream' }));
    a.download = 'speedrun-browser.safetensors';
    a.click();
  };
  const files = await fetch('data/files.json').then(r => (r.ok ? r.json() : { files: [] })).catch(() => ({ files: [] }));
  if (files.files.includes(TEST_FILE) && files.files.includes(TRAIN_FILES[0])) $('load-server').dataset.available = '1';
  if (!navigator.gpu) {
    $('adapter').innerHTML = 'This browser has no WebGPU. It is on by default in Chrome and Edge 113+ (Windows, macOS, ' +
      'ChromeOS, Android), Safari 26 and Firefox 141+ on Windows; on Linux, start Chrome with ' +
      '<code>--enable-unsafe-webgpu --enable-features=Vulkan</code>.';
    $('adapter').className = 'error';
    setState('no-webgpu');
    return;
  }
  await init();
  showRecipes(JSON.parse(recipes()));
  try {
    const a = JSON.parse(await adapter_info());
    $('adapter').textContent = `${a.name || 'unnamed adapter'} (${a.device_type}, ${a.backend}); shader-f16 ${a.shader_f16 ? 'yes' : 'no'}, ` +
      `subgroups ${a.subgroups ? 'yes' : 'no'}; storage bindings up to ${a.max_storage_binding_mib} MiB, ` +
      `${a.workgroup_memory_kib} KiB workgroup memory, ${a.invocations_per_workgroup} invocations per workgroup.`;
    // f16 storage is offered where the adapter has shader-f16; off by default until it has
    // been timed on real GPUs.
    $('half').disabled = !a.shader_f16;
    $('half-label').title = a.shader_f16 ? '' : 'this adapter has no shader-f16';
  } catch (e) {
    $('adapter').textContent = `WebGPU is present but gave no adapter: ${e.message || e}`;
    $('adapter').className = 'error';
    setState('no-webgpu');
    return;
  }
  setState('idle');
}

// The recipe picker: choosing one fills in its epochs, batch size and learning rate.
function showRecipes(list) {
  const select = $('recipe');
  for (const r of list) select.add(new Option(r.name, r.name));
  const apply = () => {
    const r = list.find(r => r.name === select.value);
    $('epochs').value = r.epochs;
    $('batch').value = r.batch_size;
    $('lr').value = r.lr;
    $('recipe-summary').textContent = r.summary;
  };
  select.addEventListener('change', apply);
  apply();
}

main();
