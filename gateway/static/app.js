// The page: a photo in, the orchestrator's events out, rendered as they arrive.
// window.i2s keeps what happened (with performance.now() times) for people and tests to inspect.
import { base64Bytes, fileAsBase64, imageToSound } from "./events.js";
import { audioContext, ClipPlayer } from "./player.js";

const $ = (id) => document.getElementById(id);
const state = window.i2s = { running: false, done: false, error: null, events: 0, clips: {}, firstPlayAt: null,
                             firstPlayContextState: null, lastClipDoneAt: null, sceneAt: null, serving: false,
                             boxes: 0 };
let photo = null;

// The button works only when a photo is chosen and the orchestrator serves (its models are loaded).
function updateButton() {
  $("go").disabled = !(photo && state.serving && !state.running);
}

// Asks /v1/ready until the orchestrator serves: at once first, then the server holds each answer until it
// serves (or ~20 s), so this loop waits on the server, not on a timer. A failed request waits 2 s.
async function waitUntilServing() {
  for (let wait = 0; !state.serving; wait = 20) {
    try {
      const response = await fetch(`/v1/ready?wait=${wait}`, { cache: "no-store" });
      state.serving = response.ok && (await response.json()).serving === true;
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
    if (!state.serving) setStatus("The models are still loading; the button turns on when they are ready.");
  }
  if (!state.running) setStatus(photo ? `${photo.name} ready.` : "Ready: choose a photo.");
  updateButton();
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function choose(file) {
  if (!file || !file.type.startsWith("image/")) { setStatus("That is not an image.", true); return; }
  photo = file;
  $("preview").src = URL.createObjectURL(file);
  $("photo-frame").hidden = false;
  $("boxes").replaceChildren();
  updateButton();
  setStatus(state.serving ? `${file.name} (${Math.round(file.size / 1024)} KiB) ready.`
                          : "The models are still loading; the button turns on when they are ready.");
}

// A source's box (0..1 of the image) drawn over the photo with its name.
function drawBox(source) {
  const b = source.location;
  if (!b || $("boxes").querySelector(`[data-source-id="${source.id}"]`)) return;
  const [x0, y0, x1, y1] = [b.xMin || 0, b.yMin || 0, b.xMax || 0, b.yMax || 0];
  const box = document.createElement("div");
  box.className = "box";
  box.dataset.sourceId = source.id;
  Object.assign(box.style, { left: `${x0 * 100}%`, top: `${y0 * 100}%`, width: `${(x1 - x0) * 100}%`,
                             height: `${(y1 - y0) * 100}%` });
  const label = document.createElement("span");
  label.textContent = source.name;
  box.append(label);
  $("boxes").append(box);
  state.boxes++;
}

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function buildRequest(data) {
  const audio = { durationSeconds: numberOrNull("seconds"), numInferenceSteps: numberOrNull("steps"),
                  encoding: "AUDIO_ENCODING_PCM_S16LE" };
  if (numberOrNull("seed") !== null) audio.seed = String(numberOrNull("seed"));
  if (numberOrNull("loudness") !== null) audio.loudnessTargetLufs = numberOrNull("loudness");
  if (Number($("rate").value)) audio.sampleRateHertz = Number($("rate").value);
  if ($("loop").checked) audio.loop = true;
  // Someone is waiting for this one: interactive (the default, said explicitly).
  const request = { image: { data, mimeType: photo.type }, audio, options: { sceneMix: true, priority: "PRIORITY_INTERACTIVE" } };
  const decoding = { locateSources: $("locate").checked };
  if (numberOrNull("vlm-seed") !== null) decoding.seed = String(numberOrNull("vlm-seed"));
  request.decoding = decoding;
  return request;
}

function download(container, name, blob, label) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.textContent = label;
  container.append(link);
  return link;
}

async function run() {
  Object.assign(state, { running: true, done: false, error: null, events: 0, clips: {}, firstPlayAt: null,
                         lastClipDoneAt: null, sceneAt: null, boxes: 0 });
  $("boxes").replaceChildren();
  audioContext().resume();  // inside the click: browsers allow sound after a user gesture
  for (const id of ["scene", "mood", "sources", "clips", "downloads"]) $(id).replaceChildren();
  $("result").hidden = false;
  $("go").disabled = true;
  setStatus("Sending the photo…");
  const players = new Map();
  const player = (ref) => {
    if (!players.has(ref.clipId)) {
      players.set(ref.clipId, new ClipPlayer(ref, $("clips"), (p, contextState) => {
        state.clips[ref.clipId].firstPlayAt = performance.now();
        if (state.firstPlayAt === null) {
          state.firstPlayAt = performance.now();
          state.firstPlayContextState = contextState;
        }
      }));
      state.clips[ref.clipId] = { fileName: ref.fileName, kind: ref.kind, firstPlayAt: null, doneAt: null };
    }
    return players.get(ref.clipId);
  };
  try {
    const request = buildRequest(await fileAsBase64(photo));
    for await (const event of imageToSound(request, { token: $("token").value })) {
      state.events++;
      if (event.scene) {
        state.sceneAt = performance.now();
        $("scene").textContent = event.scene.scene;
        $("mood").textContent = event.scene.mood || "";
        setStatus("Describing the sound sources…");
      } else if (event.source) {
        const item = document.createElement("li");
        const variants = (event.source.variants || []).map((v) => v.action).filter(Boolean).join("; ");
        item.textContent = `${event.source.name}${event.source.material ? ` (${event.source.material})` : ""}` +
                           (variants ? `: ${variants}` : "");
        $("sources").append(item);
        drawBox(event.source);
        setStatus("Making the sounds…");
      } else if (event.audio) {
        player(event.audio.clip).addChunk(event.audio.chunk, base64Bytes(event.audio.chunk.data));
      } else if (event.clipDone) {
        player(event.clipDone.clip).finish(event.clipDone);
        state.clips[event.clipDone.clip.clipId].doneAt = state.lastClipDoneAt = performance.now();
      } else if (event.clipFailed) {
        player(event.clipFailed.clip).fail(event.clipFailed);
      } else if (event.description) {
        const json = JSON.stringify(event.description, null, 2);
        download($("downloads"), "description.json", new Blob([json], { type: "application/json" }),
                 "Description (JSON)").id = "description-json";
      } else if (event.summary) {
        const s = event.summary;
        setStatus(`Done: ${s.clipsDone || 0} clips, ${s.clipsFailed || 0} failed, ${(s.totalSeconds || 0).toFixed(1)} s; ` +
                  `first audio after ${(s.timeToFirstAudioSeconds || 0).toFixed(1)} s.`);
      } else if (event.imageFailed) {
        throw new Error(event.imageFailed.message || "the image failed");
      }
    }
    const mix = [...players.values()].find((p) => p.ref.kind === "CLIP_KIND_SCENE_MIX" && p.wav);
    if (mix) download($("downloads"), mix.ref.fileName || "scene_mix.wav", mix.wav, "Stereo scene mix (WAV)").id = "scene-mix";
    state.done = true;
  } catch (error) {
    state.error = `${error.code || "error"}: ${error.message}`;
    setStatus(`Failed: ${error.message}`, true);
    if (error.code === "unavailable") {  // the models went away: wait for them again
      state.serving = false;
      waitUntilServing();
    }
  } finally {
    state.running = false;
    updateButton();
  }
}

$("photo").addEventListener("change", () => choose($("photo").files[0]));
waitUntilServing();
$("go").addEventListener("click", run);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  choose(e.dataTransfer.files[0]);
});
