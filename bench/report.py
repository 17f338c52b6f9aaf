"""The compact table the bench prints last (markdown, so it pastes into docs/performance.md)."""
from __future__ import annotations


def _s(value, unit: str = " s", digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def rows(out: dict) -> list[tuple[str, str]]:
    env, r = out["environment"], []
    where = f"{env['gpu'] or env['device']}; torch {env['torch']}, transformers {env['transformers']}, " \
            f"diffusers {env['diffusers']}; commit {env['commit']}; {env['date']}"
    r.append(("run", f"{out['mode']} {out['what']} {out['label']}".strip() + f" on {where}"))
    if out["one_gpu_for_both"]:
        r.append(("note", "both models on ONE GPU (the design puts each on its own): contention in e2e numbers"))
    paths = out.get("serving_paths") or {}
    for name, said in paths.items():  # a row says cuda-graph only where the service's health said so
        reason = f" ({said['%s-path-reason' % name]})" if f"{name}-path-reason" in said else ""
        r.append((f"{name} serving path (self-checked at start-up)", said.get(f"{name}-path", "unknown") + reason))
    vlm = out.get("vlm")
    if vlm:
        r.append(("VLM prefill / ms per output token", f"{_s(vlm['prefill_s'])} ({_s(vlm['prompt_tokens'], '', 0)} prompt tokens)"
                  f" / {_s(vlm['ms_per_token'], ' ms', 1)} ({_s(vlm['output_tokens'], '', 0)} output tokens)"))
        r.append(("VLM time to first source", _s(vlm["time_to_first_source_s"])))
    for c in out.get("vlm_concurrent") or []:
        r.append((f"VLM {c['clients']} concurrent: images/min, ms/token, first source",
                  f"{_s(c['images_per_minute'], '', 1)}, {_s(c['ms_per_token'], ' ms', 1)}, "
                  f"{_s(c['time_to_first_source_s'])}"))
    eager = out.get("vlm_eager_step")
    if eager:
        r.append(("VLM eager step, 1 request (in process): ms/token", _s(eager["ms_per_token"], " ms", 1)))
    cmp = out.get("vlm_engine_vs_generate")
    if cmp:
        for name in ("engine", "generate"):
            x = cmp[name]
            host, ops, syncs = x["host_ms_per_step"], x["ops_per_step"], x["syncs_per_step"]
            r.append((f"{name} in-process ({cmp['threads']} thread(s)): ms/token; host ms/step b1, b8; "
                      "ops, syncs/step b1, b8",
                      f"{_s(x['ms_per_token'], ' ms', 2)}; {_s(host.get('1'), '', 3)}, {_s(host.get('8'), '', 3)}; "
                      f"{_s(ops.get('1'), '', 1)}/{_s(syncs.get('1'), '', 1)}, "
                      f"{_s(ops.get('8'), '', 1)}/{_s(syncs.get('8'), '', 1)}"
                      + (f" (capture {x['capture']})" if "capture" in x else "")))
    audio = out.get("audio")
    if audio:
        per = ", ".join(f"b{b}: {_s(v, ' s', 3)}" for b, v in audio["per_clip_s"].items())
        r.append((f"audio per {audio['clip_seconds']:g} s clip (DPM {audio['steps']})", per))
        r.append(("audio real-time factor (batch 1)", _s(audio["realtime_factor"], "x", 1)))
    e2e, tp = out.get("e2e"), out.get("throughput")
    if e2e:
        r.append(("e2e first audio chunk / per image",
                  f"{_s(e2e['first_audio_s'])} / {_s(e2e['per_image_s'])} ({e2e['clips_done']} clips, "
                  f"{e2e['clips_failed']} failed)"))
    if tp:
        r.append((f"images per minute, {tp['clients']} clients", _s(tp["images_per_minute"], "", 1)))
    seed = out.get("seed_baseline")
    if seed:
        r.append(("seed-style per image (VLM + DDIM clips)",
                  f"{_s(seed['per_image_s'])} = {_s(seed['vlm_s'])} + {seed['clips_per_image']} x "
                  f"{_s(seed['ddim_clip_s'])}; ours {_s(seed['ours_per_image_s'])}; ratio {_s(seed['ratio'], 'x', 1)}"))
    for name, s in out["startup"].items():
        extra = ""
        if name == "audio" and s.get("load_s") is not None:
            extra = f" (load {_s(s['load_s'])}, warm-up {_s(s['warmup_s'])} on {s['warmed_shapes']} shapes, " \
                    f"compile={s['compile']})"
        r.append((f"start-up {name} to SERVING", _s(s["serving_s"]) + extra))
    mem = out["peak_gpu_memory_mib"]
    if mem["source"]:
        per = ", ".join(f"{k}: {_s(v, ' MiB', 0)}" for k, v in mem["per_service"].items())
        r.append(("peak GPU memory (nvidia-smi)", f"{per}; whole GPU {_s(mem['whole_gpu'], ' MiB', 0)}"))
    else:
        r.append(("peak GPU memory", "- (no nvidia-smi: CPU run)"))
    built = out["checkpoints"]
    r.append(("checkpoint build (not in start-up)", f"vlm {_s(built['vlm_build_s'])}, audio {_s(built['audio_build_s'])}"))
    if out.get("skipped"):
        r.append(("skipped at the deadline", ", ".join(out["skipped"])))
    r.append(("bench wall time", _s(out["bench_seconds"])))
    return r


def table(out: dict) -> str:
    lines = ["| what | measured |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows(out)]
    return "\n".join(lines)
