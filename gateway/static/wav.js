// PCM 16-bit samples and WAV files. The WAV holds the samples exactly as they were streamed, as the
// command line (main.py, the orchestrator client) writes them, so a download equals main.py's file.

export function pcm16Samples(bytes) {
  return new Int16Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
}

// Web Audio plays floats; the services scale PCM 16-bit by 32767.
export function asFloats(samples) {
  const out = new Float32Array(samples.length);
  for (let i = 0; i < samples.length; i++) out[i] = samples[i] / 32767;
  return out;
}

// `samples` interleave the channels (left, right, left, ... for stereo).
export function wavBlob(samples, sampleRate, channels = 1) {
  const header = 44;
  const buffer = new ArrayBuffer(header + samples.length * 2);
  const view = new DataView(buffer);
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, channels, true);
  view.setUint32(24, sampleRate, true); view.setUint32(28, sampleRate * 2 * channels, true);
  view.setUint16(32, 2 * channels, true); view.setUint16(34, 16, true);
  text(36, "data"); view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) view.setInt16(header + 2 * i, samples[i], true);
  return new Blob([buffer], { type: "audio/wav" });
}
