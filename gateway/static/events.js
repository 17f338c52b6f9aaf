// The orchestrator's events as they come: POST /v1/image-to-sound answers one proto-JSON
// ImageToSoundEvent per line. Errors before the first event come back as an HTTP status with a Connect
// error body {code, message}; an error later is a last line {"error": {code, message}}.

export class StreamError extends Error {
  constructor(code, message, status) {
    super(message || code);
    this.code = code;
    this.status = status;
  }
}

export async function* imageToSound(request, { token = "", signal } = {}) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch("/v1/image-to-sound", {
    method: "POST", headers, body: JSON.stringify(request), signal,
  });
  if (!response.ok) {
    let body = {};
    try { body = await response.json(); } catch { /* not JSON: the status says enough */ }
    throw new StreamError(body.code || "unknown", body.message || response.statusText, response.status);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += value;
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      if (!line) continue;
      const event = JSON.parse(line);
      if (event.error) throw new StreamError(event.error.code, event.error.message, 200);
      yield event;
    }
  }
}

// Bytes fields arrive as base64 in proto JSON.
export function base64Bytes(text) {
  const binary = atob(text || "");
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

export function fileAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
