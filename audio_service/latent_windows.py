"""Latent out-painting for long clips: a window's first frames held to the previous window's latent.

AudioLDM2's latent is a VAE encoding of a mel spectrogram with time along axis 2, so "the previous
window's last frames" is a slice. A window continues the last one the way RePaint in-paints, in latent
space: its overlap starts as the known latent noised to the first step's level, and after every denoising
step it is replaced by the known latent noised to the level of the next step (with the window's own
initial noise there, so the overlap is one consistent noisy sample of the known latent), and by the known
latent itself after the last step. The rest of the window is denoised freely, conditioned on the overlap
through the UNet's receptive field, so it carries on from where the last window ended.

The hold runs inside the pipeline's per-step `callback` (diffusers 0.42.1's AudioLDM2Pipeline passes the
latents tensor itself, after `scheduler.step`; writing into it changes what the next step denoises). Used
by audio_service/diffusers_backend.py; torch is imported by the caller's process only.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from audio_service.backend import Window

__all__ = ["OverlapHold"]


class OverlapHold:
    """The initial latents of one windowed batch (rows = requests x candidates) and the per-step hold.

    `initial` is drawn from the rows' generators exactly as the pipeline would draw it (so a row without
    context gets the noise a plain call gives it); pass it as the pipeline's `latents`. Call `apply(step,
    latents)` from the step callback; after the last step `final` holds every row's latent (float32)."""

    def __init__(self, pipe: Any, scheduler: Any, windows: Sequence[Window], candidates: int, generators: list,
                 frames: int, total_steps: int, device: Any, dtype: Any):
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        bins = int(pipe.vocoder.config.model_in_dim) // pipe.vae_scale_factor
        shape = (len(windows) * candidates, int(pipe.unet.config.in_channels), frames, bins)
        self.noise = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=dtype)
        self.scheduler = scheduler
        scheduler.set_timesteps(total_steps, device=device)  # the pipeline sets the same again
        self.timesteps = scheduler.timesteps.clone()
        self.total_steps = total_steps
        # (row, known latent (1, C, O, bins), overlap frames) for every row that continues a window.
        self.rows: list[tuple[int, Any, int]] = []
        for b, window in enumerate(windows):
            if window.context is None:
                continue
            known = torch.from_numpy(np.ascontiguousarray(window.context, dtype=np.float32))[None].to(device, dtype)
            if known.shape[2] != window.overlap_frames or known.shape[1] != shape[1] or known.shape[3] != bins:
                raise ValueError(f"window context of shape {tuple(known.shape[1:])} does not fit "
                                 f"({shape[1]}, {window.overlap_frames}, {bins})")
            for c in range(candidates):
                self.rows.append((b * candidates + c, known, window.overlap_frames))
        self.initial = self.noise.clone()
        self._hold(self.initial, self.timesteps[0])
        self.final: np.ndarray | None = None

    def _hold(self, latents: Any, timestep: Any | None) -> None:
        for row, known, overlap in self.rows:
            if timestep is None:  # after the last step: the known latent itself
                latents[row : row + 1, :, :overlap] = known
            else:
                noise = self.noise[row : row + 1, :, :overlap]
                latents[row : row + 1, :, :overlap] = self.scheduler.add_noise(known, noise, timestep.reshape(1))

    def apply(self, step_index: int, latents: Any) -> None:
        """After step `step_index` (0-based) the latents sit at the next timestep's level (clean after the last)."""
        last = step_index + 1 >= self.total_steps
        self._hold(latents, None if last else self.timesteps[step_index + 1])
        if last:
            self.final = latents.detach().float().cpu().numpy()
