// One clip on the page: its chunks are played through Web Audio as they arrive (each scheduled right after
// the previous one), then the whole clip gets an <audio> player, a waveform, a spectrogram, its loudness and
// a download. Variant clips are mono; the scene mix is stereo (chunks interleave left and right).
// A long clip plays as its windows arrive (its joins are marked on the spectrogram); a loop's player loops.
import { asFloats, pcm16Samples, wavBlob } from "./wav.js";

let context = null;
export function audioContext() {
  context = context || new AudioContext();
  return context;
}

export class ClipPlayer {
  constructor(ref, container, onFirstPlay) {
    this.ref = ref;
    this.samples = [];  // Int16Array per chunk
    this.sampleRate = 16000;
    this.channels = 1;
    this.nextTime = 0;
    this.onFirstPlay = onFirstPlay;
    this.element = document.createElement("div");
    this.element.className = "clip";
    this.element.dataset.clipId = ref.clipId;
    const title = document.createElement("h3");
    title.textContent = ref.kind === "CLIP_KIND_SCENE_MIX" ? "Stereo scene mix" : ref.fileName || ref.clipId;
    this.state = document.createElement("p");
    this.state.className = "state";
    this.state.textContent = "waiting for audio…";
    this.element.append(title, this.state);
    container.append(this.element);
  }

  addChunk(chunk, bytes) {
    if (chunk.sampleRateHertz) this.sampleRate = chunk.sampleRateHertz;
    if (chunk.channels) this.channels = chunk.channels;
    const samples = pcm16Samples(bytes);
    this.samples.push(samples);
    if (!samples.length) return;
    const ctx = audioContext();
    const frames = samples.length / this.channels;
    const buffer = ctx.createBuffer(this.channels, frames, this.sampleRate);
    const floats = asFloats(samples);
    for (let c = 0; c < this.channels; c++) {
      const channel = new Float32Array(frames);
      for (let i = 0; i < frames; i++) channel[i] = floats[i * this.channels + c];
      buffer.copyToChannel(channel, c);
    }
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    const startAt = Math.max(ctx.currentTime + 0.05, this.nextTime);
    source.start(startAt);
    this.nextTime = startAt + buffer.duration;
    if (this.samples.length === 1) {
      this.state.textContent = "playing while it streams…";
      this.onFirstPlay(this, ctx.state);
    }
  }

  pcm() {
    const total = this.samples.reduce((n, s) => n + s.length, 0);
    const all = new Int16Array(total);
    let offset = 0;
    for (const s of this.samples) { all.set(s, offset); offset += s.length; }
    return all;
  }

  finish(done) {
    const samples = this.pcm();
    this.wav = wavBlob(samples, this.sampleRate, this.channels);
    const floats = asFloats(samples);
    const seconds = (floats.length / this.channels / this.sampleRate).toFixed(1);
    const seed = done.metadata?.seed === undefined ? "" : ` · seed ${done.metadata.seed}`;
    this.state.textContent = `${seconds} s${seed} · ${done.prompt || ""}`;
    const level = document.createElement("p");
    level.className = "level";
    level.textContent = loudnessText(done.metadata || {}, this.sampleRate, this.channels);
    this.element.append(level);
    const mono = this.channels === 1 ? floats : downmix(floats, this.channels);  // what the pictures show
    const joins = (done.metadata?.windowJoinSamples || []).map(Number);
    this.element.append(canvas("waveform", (c) => drawWaveform(c, mono)),
                        canvas("spectrogram", (c) => { drawSpectrogram(c, mono); markJoins(c, joins, mono.length); }));
    const audio = document.createElement("audio");
    audio.controls = true;
    // A loop clip loops as written: [loopStartSample, loopEndSample) is the whole clip (audio_service/loops.py).
    audio.loop = done.metadata?.loopEndSample !== undefined;
    if (audio.loop) this.state.textContent += " · loop";
    audio.src = URL.createObjectURL(this.wav);
    const link = document.createElement("a");
    link.href = audio.src;
    link.download = this.ref.fileName || `${this.ref.clipId}.wav`;
    link.className = "wav";
    link.textContent = `Download ${link.download}`;
    this.element.append(audio, link);
  }

  fail(failed) {
    this.element.classList.add("failed");
    this.state.textContent = `failed: ${failed.message || failed.code}`;
  }
}

// Loudness (ITU-R BS.1770, measured by the services) and peak, as the gallery shows them.
export function loudnessText(metadata, sampleRate, channels) {
  const lufs = metadata.loudnessLufs === undefined ? "silent" : `${metadata.loudnessLufs.toFixed(1)} LUFS`;
  const peak = metadata.peakDbfs === undefined ? "" : ` · peak ${metadata.peakDbfs.toFixed(1)} dBFS`;
  return `${lufs}${peak} · ${sampleRate} Hz ${channels === 2 ? "stereo" : "mono"}`;
}

function downmix(floats, channels) {
  const out = new Float32Array(floats.length / channels);
  for (let i = 0; i < out.length; i++) {
    let sum = 0;
    for (let c = 0; c < channels; c++) sum += floats[i * channels + c];
    out[i] = sum / channels;
  }
  return out;
}

function canvas(kind, draw) {
  const c = document.createElement("canvas");
  c.className = kind;
  c.width = 600;
  c.height = 64;
  draw(c);
  return c;
}

function markJoins(c, joins, total) {  // where a long clip's windows meet (the middle of each crossfade)
  const g = c.getContext("2d");
  g.fillStyle = "#fff";
  for (const at of joins) g.fillRect(Math.round(at / total * c.width), 0, 1, c.height);
}

function drawWaveform(c, floats) {
  const g = c.getContext("2d");
  const mid = c.height / 2;
  const per = Math.max(1, Math.floor(floats.length / c.width));
  g.fillStyle = "#3a5";
  for (let x = 0; x < c.width; x++) {
    let lo = 0, hi = 0;
    for (let i = x * per; i < Math.min(floats.length, (x + 1) * per); i++) {
      lo = Math.min(lo, floats[i]); hi = Math.max(hi, floats[i]);
    }
    g.fillRect(x, mid - hi * mid, 1, Math.max(1, (hi - lo) * mid));
  }
}

const FFT_SIZE = 256;

function fftMagnitudes(frame) {  // radix-2, in place on copies; returns |X[k]| for k < N/2
  const n = frame.length, re = Float64Array.from(frame), im = new Float64Array(n);
  for (let i = 1, j = 0; i < n; i++) {
    let bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) { [re[i], re[j]] = [re[j], re[i]]; }
  }
  for (let len = 2; len <= n; len <<= 1) {
    const angle = -2 * Math.PI / len;
    for (let i = 0; i < n; i += len) {
      for (let k = 0; k < len / 2; k++) {
        const wr = Math.cos(angle * k), wi = Math.sin(angle * k);
        const a = i + k, b = a + len / 2;
        const tr = re[b] * wr - im[b] * wi, ti = re[b] * wi + im[b] * wr;
        re[b] = re[a] - tr; im[b] = im[a] - ti; re[a] += tr; im[a] += ti;
      }
    }
  }
  const out = new Float64Array(n / 2);
  for (let k = 0; k < n / 2; k++) out[k] = Math.hypot(re[k], im[k]);
  return out;
}

function drawSpectrogram(c, floats) {
  const g = c.getContext("2d");
  const image = g.createImageData(c.width, c.height);
  const hop = Math.max(1, Math.floor((floats.length - FFT_SIZE) / c.width));
  const frame = new Float64Array(FFT_SIZE);
  for (let x = 0; x < c.width; x++) {
    const start = x * hop;
    for (let i = 0; i < FFT_SIZE; i++) {
      const hann = 0.5 - 0.5 * Math.cos(2 * Math.PI * i / (FFT_SIZE - 1));
      frame[i] = (floats[start + i] || 0) * hann;
    }
    const mags = fftMagnitudes(frame);
    for (let y = 0; y < c.height; y++) {
      const k = Math.floor((c.height - 1 - y) * (mags.length / c.height));
      const db = 20 * Math.log10(mags[k] + 1e-6);
      const v = Math.max(0, Math.min(255, Math.round((db + 60) * 255 / 80)));
      const p = 4 * (y * c.width + x);
      image.data[p] = v; image.data[p + 1] = Math.round(v * 0.6); image.data[p + 2] = 255 - v; image.data[p + 3] = 255;
    }
  }
  g.putImageData(image, 0, 0);
}
