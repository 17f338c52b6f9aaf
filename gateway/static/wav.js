// PCM 16-bit samples and WAV files, written exactly as the command line (main.py, the orchestrator
// client) writes them: the client turns the streamed samples into floats s / 32767 (float32) and
// libsndfile writes them back as 16-bit by floor(x * 32768), clipped. Doing the same here makes the
// page's download byte-identical to main.py's file for the same seed.

export function pcm16Samples(bytes) {
  return new Int16Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
}

export function asFloats(samples) {
  const out = new Float32Array(samples.length);
  for (let i = 0; i < samples.length; i++) out[i] = samples[i] / 32767;  // Float32Array rounds as numpy does
  return out;
}

function fileSample(x) {
  const y = Math.floor(Math.min(1, Math.max(-1, x)) * 32768);
  return Math.max(-32768, Math.min(32767, y));
}

export function wavBlob(floats, sampleRate) {
  const header = 44;
  const buffer = new ArrayBuffer(header + floats.length * 2);
  const view = new DataView(buffer);
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + floats.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, sampleRate, true); view.setUint32(28, sampleRate * 2, true);
  view.setUint16(32, 2, true); view.setUint16(34, 16, true);
  text(36, "data"); view.setUint32(40, floats.length * 2, true);
  for (let i = 0; i < floats.length; i++) view.setInt16(header + 2 * i, fileSample(floats[i]), true);
  return new Blob([buffer], { type: "audio/wav" });
}
